//! `unibus user add|list|revoke` (admins).

use clap::Subcommand;

use super::conn::{self, ConnArgs};
use super::output::{self, fail};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user by its public key (from `unibus keygen`).
    Add {
        key: String,
        /// May manage users.
        #[arg(long)]
        admin: bool,
        /// A human-readable name (default: `user`).
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List every user.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke a user: it is never admitted again, and its live connections lose their rights.
    Revoke {
        key: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn run(command: UserCommand) -> u8 {
    match command {
        UserCommand::Add {
            key,
            admin,
            name,
            json,
            conn,
        } => {
            let client = match conn::client(&conn).await {
                Ok(c) => c,
                Err(code) => return code,
            };
            let name = if name.is_empty() {
                "user".to_string()
            } else {
                name
            };
            match client.add_user(&key, &name, admin).await {
                Ok(user) if json => output::json(&user),
                Ok(user) => {
                    println!(
                        "added user {}{}",
                        user.key,
                        if user.admin { " (admin)" } else { "" }
                    );
                    0
                }
                Err(e) => fail(&e),
            }
        }
        UserCommand::List { json, conn } => {
            let client = match conn::client(&conn).await {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.list_users().await {
                Ok(users) if json => output::json(&users),
                Ok(users) => {
                    let rows: Vec<Vec<String>> = users
                        .iter()
                        .map(|u| {
                            vec![
                                u.key.clone(),
                                if u.admin { "admin" } else { "user" }.into(),
                                if u.revoked_at.is_some() {
                                    "revoked"
                                } else {
                                    "active"
                                }
                                .into(),
                                output::time(u.created_at),
                                u.name.clone(),
                            ]
                        })
                        .collect();
                    output::table(&["KEY", "ROLE", "STATE", "CREATED", "NAME"], &rows);
                    0
                }
                Err(e) => fail(&e),
            }
        }
        UserCommand::Revoke { key, json, conn } => {
            let client = match conn::client(&conn).await {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.revoke_user(&key).await {
                Ok(user) if json => output::json(&user),
                Ok(user) => {
                    println!(
                        "revoked user {} at {}",
                        user.key,
                        output::maybe_time(user.revoked_at)
                    );
                    0
                }
                Err(e) => fail(&e),
            }
        }
    }
}
