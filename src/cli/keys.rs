//! `unibus keygen`.

use std::path::Path;

use unibus::auth::keys;

/// Writes a fresh user nkey seed (0600, never over an existing file) and prints its public
/// key: the key an admin adds with `unibus user add`.
pub fn keygen(out: &Path) -> u8 {
    let pair = keys::generate_user();
    let seed = match pair.seed() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot encode the seed: {e}");
            return 2;
        }
    };
    match keys::create_secret(out, format!("{seed}\n").as_bytes()) {
        Ok(()) => {
            println!("{}", pair.public_key());
            eprintln!(
                "seed written to {} (mode 0600); keep it secret",
                out.display()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}
