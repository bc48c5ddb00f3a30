//! NATS JWTs (v2), encoded and verified by hand.
//!
//! A NATS JWT is `base64url(header) "." base64url(claims) "." base64url(signature)`, all
//! without padding; the header is `{"typ":"JWT","alg":"ed25519-nkey"}` and the signature is
//! the issuer nkey's ed25519 signature over the first two parts joined by the dot. The issuer
//! is the claims' own `iss`, so verifying proves *who* signed; whether that signer is
//! trusted is the caller's question (see [`super::callout`]). This is the whole format,
//! which is why there is no crate for it here: none decoded nats-server 2.15's auth requests
//! cleanly (DESIGN §13), and the format is small enough to own.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use ring::digest::{SHA256, digest};
use serde_json::{Map, Value};

/// The only header unibus writes or accepts.
pub const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
const ALGORITHM: &str = "ed25519-nkey";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a NATS JWT: {0}")]
    Format(String),
    #[error("JWT signature does not verify for its issuer")]
    BadSignature,
    #[error("cannot sign JWT: {0}")]
    Sign(String),
}

/// A JWT whose signature verified against its `iss`.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The signer's public nkey (`iss`).
    pub issuer: String,
    /// The claims object, `nats` included.
    pub claims: Map<String, Value>,
}

/// Signs `claims` (an object) with `signer`, filling in `iss`, `iat` (now, unix seconds)
/// and `jti` (a digest of the rest, as nats-io/jwt does, so equal claims get equal ids).
pub fn encode(mut claims: Map<String, Value>, signer: &KeyPair) -> Result<String, JwtError> {
    claims.insert("iss".into(), signer.public_key().into());
    claims.insert("iat".into(), now_secs().into());
    claims.remove("jti");
    let without_id = serde_json::to_vec(&claims).map_err(|e| JwtError::Sign(e.to_string()))?;
    let id = URL_SAFE_NO_PAD.encode(digest(&SHA256, &without_id).as_ref());
    claims.insert("jti".into(), id.into());
    let payload = serde_json::to_vec(&claims).map_err(|e| JwtError::Sign(e.to_string()))?;
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let sig = signer
        .sign(signed.as_bytes())
        .map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// Decodes `token` and verifies its signature against the issuer it names.
pub fn decode(token: &[u8]) -> Result<Verified, JwtError> {
    let token = std::str::from_utf8(token)
        .map_err(|_| JwtError::Format("not UTF-8".into()))?
        .trim();
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Format(
            "expected three dot-separated parts".into(),
        ));
    };
    let part = |name: &str, text: &str| {
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|e| JwtError::Format(format!("{name} is not base64url: {e}")))
    };
    let header: Value = serde_json::from_slice(&part("header", header)?)
        .map_err(|e| JwtError::Format(format!("header: {e}")))?;
    let typ = header.get("typ").and_then(Value::as_str).unwrap_or("");
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if !typ.eq_ignore_ascii_case("jwt") || alg != ALGORITHM {
        return Err(JwtError::Format(format!(
            "header must be typ JWT, alg {ALGORITHM}; got typ {typ:?}, alg {alg:?}"
        )));
    }
    let claims: Map<String, Value> = serde_json::from_slice(&part("claims", payload)?)
        .map_err(|e| JwtError::Format(format!("claims: {e}")))?;
    let sig = part("signature", sig)?;
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Format("claims have no iss".into()))?
        .to_string();
    let key = KeyPair::from_public_key(&issuer)
        .map_err(|e| JwtError::Format(format!("iss is not a public nkey: {e}")))?;
    // Three parts were found above, so the last dot exists: everything before it is signed.
    let signed_len = token.rfind('.').unwrap_or(0);
    key.verify(&token.as_bytes()[..signed_len], &sig)
        .map_err(|_| JwtError::BadSignature)?;
    Ok(Verified { issuer, claims })
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn encode_then_decode_round_trips_and_names_the_signer() {
        let account = KeyPair::new_account();
        let token = encode(
            claims(json!({"sub": "x", "nats": {"type": "user"}})),
            &account,
        )
        .unwrap();
        let back = decode(token.as_bytes()).unwrap();
        assert_eq!(back.issuer, account.public_key());
        assert_eq!(back.claims["sub"], "x");
        assert_eq!(back.claims["nats"]["type"], "user");
        assert!(back.claims["jti"].as_str().is_some_and(|s| !s.is_empty()));
        let header = token.split('.').next().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(header).unwrap(), HEADER.as_bytes());
    }

    #[test]
    fn a_changed_payload_or_a_swapped_issuer_fails() {
        let account = KeyPair::new_account();
        let token = encode(claims(json!({"sub": "x"})), &account).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims(json!({"sub": "y"}));
        forged.insert("iss".into(), account.public_key().into());
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(
            decode(tampered.as_bytes()).unwrap_err(),
            JwtError::BadSignature
        );

        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.e30.AA",
            &format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"HS256"}"#),
                parts[1],
                parts[2]
            ),
        ] {
            assert!(
                matches!(decode(bad.as_bytes()), Err(JwtError::Format(_))),
                "{bad}"
            );
        }
    }
}
