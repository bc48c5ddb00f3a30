//! `unibus room create|list|members|invite|join|remove|leave|rekey|delete`.

use clap::Subcommand;
use serde_json::json;

use super::conn::{self, ConnArgs};
use super::output::{self, fail};

#[derive(Subcommand)]
pub enum RoomCommand {
    /// Create a room you own (`^[a-z0-9][a-z0-9_-]{0,62}$`).
    Create {
        room: String,
        /// End-to-end encrypted: bodies sealed with a room key only members hold.
        #[arg(long)]
        encrypted: bool,
        /// A human-readable name (default: the room id).
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Your rooms (admins: every room, or another user's with --for).
    List {
        #[arg(long = "for", value_name = "KEY")]
        for_user: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// A room's members.
    Members {
        room: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Invite a user (owners); they join with `unibus room join`.
    Invite {
        room: String,
        key: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Accept an invitation.
    Join {
        room: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Remove a member (owners); an encrypted room gets a new key epoch.
    Remove {
        room: String,
        key: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Leave a room.
    Leave {
        room: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Make a new key epoch wrapped for the current members (owners, encrypted rooms).
    Rekey {
        room: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a room with its members, keys and history (owners).
    Delete {
        room: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

macro_rules! connect {
    ($conn:expr) => {
        match conn::client(&$conn).await {
            Ok(c) => c,
            Err(code) => return code,
        }
    };
}

/// Prints `done` (or, with --json, `value`) for a successful call.
fn done(json: bool, value: serde_json::Value, text: String) -> u8 {
    if json {
        output::json(&value)
    } else {
        println!("{text}");
        0
    }
}

pub async fn run(command: RoomCommand) -> u8 {
    match command {
        RoomCommand::Create {
            room,
            encrypted,
            name,
            json,
            conn,
        } => {
            let client = connect!(conn);
            match client.create_room(&room, &name, encrypted).await {
                Ok(r) if json => output::json(&r),
                Ok(r) => {
                    let how = if r.encrypted {
                        "encrypted room"
                    } else {
                        "room"
                    };
                    println!("created {how} {}", r.id);
                    0
                }
                Err(e) => fail(&e),
            }
        }
        RoomCommand::List {
            for_user,
            json,
            conn,
        } => {
            let client = connect!(conn);
            match client.list_rooms(for_user.as_deref()).await {
                Ok(rooms) if json => output::json(&rooms),
                Ok(rooms) => {
                    let rows: Vec<Vec<String>> = rooms
                        .iter()
                        .map(|r| {
                            vec![
                                r.id.clone(),
                                if r.encrypted { "yes" } else { "no" }.into(),
                                r.owner.clone(),
                                output::time(r.created_at),
                                r.name.clone(),
                            ]
                        })
                        .collect();
                    output::table(&["ROOM", "ENCRYPTED", "OWNER", "CREATED", "NAME"], &rows);
                    0
                }
                Err(e) => fail(&e),
            }
        }
        RoomCommand::Members { room, json, conn } => {
            let client = connect!(conn);
            match client.members(&room).await {
                Ok(members) if json => output::json(&members),
                Ok(members) => {
                    let rows: Vec<Vec<String>> = members
                        .iter()
                        .map(|m| {
                            vec![
                                m.endpoint.clone(),
                                m.role.as_str().into(),
                                m.state.as_str().into(),
                                output::time(m.added_at),
                            ]
                        })
                        .collect();
                    output::table(&["KEY", "ROLE", "STATE", "ADDED"], &rows);
                    0
                }
                Err(e) => fail(&e),
            }
        }
        RoomCommand::Invite {
            room,
            key,
            json,
            conn,
        } => {
            let client = connect!(conn);
            match client.invite(&room, &key).await {
                Ok(m) => done(
                    json,
                    json!(m),
                    format!("invited {} to {}", m.endpoint, m.room),
                ),
                Err(e) => fail(&e),
            }
        }
        RoomCommand::Join { room, json, conn } => {
            let client = connect!(conn);
            // Register this client's xkey first, so the owner can wrap keys for it.
            if let Err(e) = client.register_xkey().await {
                return fail(&e);
            }
            match client.join(&room).await {
                Ok(m) => done(json, json!(m), format!("joined {}", m.room)),
                Err(e) => fail(&e),
            }
        }
        RoomCommand::Remove {
            room,
            key,
            json,
            conn,
        } => {
            let client = connect!(conn);
            match client.remove_member(&room, &key).await {
                Ok(()) => done(
                    json,
                    json!({"room": room, "removed": key}),
                    format!("removed {key} from {room}"),
                ),
                Err(e) => fail(&e),
            }
        }
        RoomCommand::Leave { room, json, conn } => {
            let client = connect!(conn);
            match client.leave(&room).await {
                Ok(()) => done(
                    json,
                    json!({"room": room, "left": true}),
                    format!("left {room}"),
                ),
                Err(e) => fail(&e),
            }
        }
        RoomCommand::Rekey { room, json, conn } => {
            let client = connect!(conn);
            match client.rekey(&room).await {
                Ok(k) => done(
                    json,
                    json!({"room": k.room, "epoch": k.epoch, "created_at": k.created_at}),
                    format!("room {} is at key epoch {}", k.room, k.epoch),
                ),
                Err(e) => fail(&e),
            }
        }
        RoomCommand::Delete { room, json, conn } => {
            let client = connect!(conn);
            match client.delete_room(&room).await {
                Ok(()) => done(
                    json,
                    json!({"room": room, "deleted": true}),
                    format!("deleted {room}"),
                ),
                Err(e) => fail(&e),
            }
        }
    }
}
