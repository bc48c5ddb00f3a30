//! The security material a node runs with, resolved once at start-up.
//!
//! A node with `bus-auth` on or `bus-tls` on needs cluster secrets: the callout issuer, its
//! own service identity, the bootstrap admin, route credentials, the CA and its TLS
//! certificate. They come from `--secrets DIR` (written by `unibus cluster init` and shared
//! by every node), or — for a single node started without them — from a dev set the node
//! makes under its data dir on first boot (`auth::certs::dev_secrets`), reused after.
//! `--tls-cert/--tls-key/--tls-ca` replace only the TLS files.
//!
//! A node with both off needs none of this and runs an open nats-server: that is what
//! `bus-auth=off`, `bus-tls=false` mean, and it is not the default.

use std::path::{Path, PathBuf};

use crate::auth::certs::{self, ClusterSecrets};
use crate::config::{BusAuth, Config, ConfigError};

/// TLS files for the client listener and routes.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// What a node needs to render its nats-server config and to connect to it.
#[derive(Clone, Debug)]
pub struct Security {
    pub bus_auth: BusAuth,
    pub secrets: Option<ClusterSecrets>,
    pub tls: Option<TlsFiles>,
}

impl Security {
    /// Resolves the node's secrets (making dev ones on first boot when none are given).
    pub fn resolve(config: &Config, data_dir: &Path) -> Result<Security, ConfigError> {
        let bus_auth = config.flags.bus_auth;
        if bus_auth == BusAuth::Off && !config.flags.bus_tls {
            return Ok(Security {
                bus_auth,
                secrets: None,
                tls: None,
            });
        }
        let secrets = match &config.secrets {
            Some(dir) => ClusterSecrets::load(dir)
                .map_err(|e| ConfigError::new("--secrets", e.to_string()))?,
            None => {
                let fresh = !data_dir.join("secrets").exists();
                let secrets = certs::dev_secrets(data_dir, &config.name).map_err(|e| {
                    ConfigError::new("--secrets", format!("cannot make dev secrets: {e}"))
                })?;
                if fresh {
                    tracing::warn!(
                        ca = %secrets.ca_cert.display(),
                        admin_seed = %secrets.admin_seed.display(),
                        "first boot without --secrets: made a dev CA and a bootstrap admin (keep the admin seed safe)"
                    );
                }
                secrets
            }
        };
        let tls = if !config.flags.bus_tls {
            None
        } else if let (Some(cert), Some(key), Some(ca)) =
            (&config.tls_cert, &config.tls_key, &config.tls_ca)
        {
            Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })
        } else {
            let node = secrets.node(&config.name).ok_or_else(|| {
                ConfigError::new(
                    "--secrets",
                    format!(
                        "{} has no certificate for node `{}`; run `unibus cluster init` with it in --nodes",
                        secrets.dir.display(),
                        config.name
                    ),
                )
            })?;
            Some(TlsFiles {
                cert: node.cert.clone(),
                key: node.key.clone(),
                ca: secrets.ca_cert.clone(),
            })
        };
        Ok(Security {
            bus_auth,
            secrets: Some(secrets),
            tls,
        })
    }

    /// Connect options for the node's own connections to its nats-server: the service
    /// identity (listed in `auth_users`, so it bypasses the callout — the authenticator
    /// cannot authenticate itself) and the pinned CA.
    pub fn service_connect_options(&self) -> Result<async_nats::ConnectOptions, String> {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(secrets) = &self.secrets
            && self.bus_auth != BusAuth::Off
        {
            let seed = std::fs::read_to_string(&secrets.service_seed).map_err(|e| {
                format!(
                    "cannot read the service seed {}: {e}",
                    secrets.service_seed.display()
                )
            })?;
            options = options.nkey(seed.trim().to_string());
        }
        Ok(self.pin_ca(options))
    }

    /// Connect options for the node's system-account connection (live revocation: `CONNZ`
    /// and `KICK` are system requests): the system user, listed in `auth_users` and living
    /// in `SYS`, and the pinned CA. `Ok(None)` when there is nothing to revoke through —
    /// `bus-auth=off` admits everyone with open permissions — or the secrets predate the
    /// system user (see `auth::certs`).
    pub fn system_connect_options(&self) -> Result<Option<async_nats::ConnectOptions>, String> {
        let Some(secrets) = &self.secrets else {
            return Ok(None);
        };
        let Some(path) = &secrets.system_seed else {
            return Ok(None);
        };
        if self.bus_auth == BusAuth::Off {
            return Ok(None);
        }
        let seed = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the system seed {}: {e}", path.display()))?;
        let options = async_nats::ConnectOptions::new().nkey(seed.trim().to_string());
        Ok(Some(self.pin_ca(options)))
    }

    /// The node's identity in the `APP` account, derived from the service seed
    /// (`auth::keys::derive_user(service, "app")`): it serves the control plane where
    /// clients are, and owns the `ROOMS` stream. None without secrets or with `bus-auth`
    /// off (then there are no accounts and the service identity is used as is).
    pub fn app_user(&self) -> Result<Option<nkeys::KeyPair>, String> {
        let Some(secrets) = &self.secrets else {
            return Ok(None);
        };
        if self.bus_auth == BusAuth::Off {
            return Ok(None);
        }
        let service =
            crate::auth::keys::read_user_seed(&secrets.service_seed).map_err(|e| e.to_string())?;
        crate::auth::keys::derive_user(&service, "app")
            .map(Some)
            .map_err(|e| format!("cannot derive the node's APP key: {e}"))
    }

    /// Connect options for the node's connections into `APP` (see [`Security::app_user`]).
    pub fn app_connect_options(&self) -> Result<async_nats::ConnectOptions, String> {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(app) = self.app_user()? {
            let seed = app.seed().map_err(|e| e.to_string())?;
            options = options.nkey(seed);
        }
        Ok(self.pin_ca(options))
    }

    /// Requires TLS and pins the cluster's CA, when TLS is on.
    fn pin_ca(&self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        match &self.tls {
            Some(tls) => options
                .require_tls(true)
                .add_root_certificates(tls.ca.clone()),
            None => options,
        }
    }

    /// Where the node prints how to connect.
    pub fn summary(&self) -> String {
        match &self.secrets {
            Some(s) => format!(
                "bus-auth={}, bus-tls={}; CA {}, bootstrap admin seed {}",
                self.bus_auth.as_str(),
                self.tls.is_some(),
                self.tls
                    .as_ref()
                    .map(|t| t.ca.display().to_string())
                    .unwrap_or_else(|| s.ca_cert.display().to_string()),
                s.admin_seed.display()
            ),
            None => {
                "bus-auth=off, bus-tls=false: an open server (no authentication, no TLS)".into()
            }
        }
    }
}
