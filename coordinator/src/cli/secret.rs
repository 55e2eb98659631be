//! `drover secret set|list|rm`: secrets a task spec can grant (for the egress proxy to add to
//! requests), stored encrypted on the coordinator. A value goes in once, from stdin or a file,
//! and is never printed again by any command.

use super::client::OperatorClient;
use super::settings;
use super::{CliError, ConnArgs, JsonArg};
use clap::Subcommand;
use drover_protocol::secrets::{check_secret_name, MAX_SECRET_BYTES, MIN_SECRET_BYTES};
use drover_protocol::{OperatorRequest, OperatorResponse, Secret, SecretInfo};
use std::io::{IsTerminal, Read};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a secret, replacing one of the same name. The value is read from stdin (one
    /// trailing newline is dropped), or from --from-file; at a terminal it is asked for without
    /// echo. It is never shown again.
    ///
    ///   printf %s "$GITHUB_TOKEN" | drover secret set github
    Set {
        /// 1 to 64 letters, digits, '_', '-' or '.'.
        name: String,
        /// Read the value from this file instead of stdin (taken as it is).
        #[arg(long, value_name = "PATH")]
        from_file: Option<PathBuf>,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Names of the stored secrets, with when each was set (never a value).
    List {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Forget a secret. Tasks that grant it fail to start from then on.
    Rm {
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

fn usage(message: String) -> CliError {
    CliError::new(super::exit::USAGE, message)
}

/// The value from `file`, or stdin (without echo at a terminal).
fn read_value(name: &str, file: Option<&PathBuf>) -> Result<String, CliError> {
    let raw = match file {
        Some(path) => std::fs::read(path).map_err(|e| {
            CliError::new(
                super::exit::FAILURE,
                format!("cannot read {}: {e}", path.display()),
            )
        })?,
        None if std::io::stdin().is_terminal() => {
            eprint!("value for secret {name}: ");
            let line = read_hidden_line().map_err(|e| {
                CliError::new(super::exit::FAILURE, format!("cannot read the value: {e}"))
            })?;
            eprintln!();
            line.into_bytes()
        }
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .take(MAX_SECRET_BYTES as u64 + 2)
                .read_to_end(&mut buf)
                .map_err(|e| {
                    CliError::new(super::exit::FAILURE, format!("cannot read stdin: {e}"))
                })?;
            if buf.ends_with(b"\r\n") {
                buf.truncate(buf.len() - 2);
            } else if buf.ends_with(b"\n") {
                buf.pop();
            }
            buf
        }
    };
    let value = String::from_utf8(raw)
        .map_err(|_| usage(format!("the value of {name} is not UTF-8 text")))?;
    if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&value.len()) {
        return Err(usage(format!(
            "the value of {name} has {} bytes; secrets are {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} \
             bytes (pipe it in: printf %s \"$TOKEN\" | drover secret set {name})",
            value.len()
        )));
    }
    Ok(value)
}

/// One line from the terminal with echo off.
fn read_hidden_line() -> std::io::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).map_err(std::io::Error::from)?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).map_err(std::io::Error::from)?;
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

async fn ask(conn: &ConnArgs, req: OperatorRequest) -> Result<OperatorResponse, CliError> {
    let s = settings::resolve(conn)?;
    let mut client = OperatorClient::connect(&s).await?;
    let answer = client.ask(&req).await;
    client.close().await;
    answer
}

fn unexpected(r: OperatorResponse) -> CliError {
    CliError::new(super::exit::FAILURE, format!("unexpected answer: {r:?}"))
}

pub async fn secret(cmd: SecretCommand) -> Result<(), CliError> {
    match cmd {
        SecretCommand::Set {
            name,
            from_file,
            conn,
            json,
        } => {
            check_secret_name(&name).map_err(usage)?;
            let value = Secret(read_value(&name, from_file.as_ref())?);
            match ask(&conn, OperatorRequest::SetSecret { name, value }).await? {
                OperatorResponse::SecretSet { info, created } => {
                    if json.json {
                        outln!(
                            "{}",
                            serde_json::to_string_pretty(
                                &serde_json::json!({ "info": info, "created": created })
                            )?
                        );
                    } else if created {
                        outln!("stored secret {} (version {})", info.name, info.version);
                    } else {
                        outln!(
                            "replaced secret {} (now version {})",
                            info.name,
                            info.version
                        );
                    }
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        SecretCommand::List { conn, json } => match ask(&conn, OperatorRequest::ListSecrets).await?
        {
            OperatorResponse::Secrets(list) => {
                if json.json {
                    outln!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    print_secrets(&list);
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        SecretCommand::Rm { name, conn } => {
            match ask(&conn, OperatorRequest::RemoveSecret { name }).await? {
                OperatorResponse::SecretRemoved {
                    name,
                    changed: true,
                } => {
                    outln!("removed secret {name}");
                    Ok(())
                }
                OperatorResponse::SecretRemoved {
                    name,
                    changed: false,
                } => Err(CliError::new(
                    super::exit::FAILURE,
                    format!("no secret named {name:?}; `drover secret list` shows them"),
                )),
                other => Err(unexpected(other)),
            }
        }
    }
}

fn print_secrets(list: &[SecretInfo]) {
    if list.is_empty() {
        outln!("no secrets stored; add one with: printf %s \"$TOKEN\" | drover secret set NAME");
        return;
    }
    outln!("{:<32} {:>7} {:<24} CREATED", "NAME", "VERSION", "UPDATED");
    for s in list {
        outln!(
            "{:<32} {:>7} {:<24} {}",
            s.name,
            s.version,
            super::output::timestamp(s.updated_ms),
            super::output::timestamp(s.created_ms)
        );
    }
}
