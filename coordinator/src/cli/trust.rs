//! `drover token create|list|revoke` (join tokens for enrolling workers) and
//! `drover worker revoke|reinstate` (the certificate revocation list).

use super::client::OperatorClient;
use super::settings::{self, Resolved};
use super::{CliError, ConnArgs, JsonArg};
use crate::tasks::units::parse_duration;
use clap::{Args, Subcommand};
use drover_protocol::{OperatorRequest, OperatorResponse, TokenInfo};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a join token: a new worker given the coordinator address, the CA fingerprint and
    /// this token (`drover-worker join`) enrolls itself. The token is printed once and stored
    /// only hashed; it expires after --ttl and allows --uses enrollments.
    Create(CreateArgs),
    /// Join tokens still usable (not expired, used up or revoked). Secrets are never shown.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Make a join token unusable (by its public id, the part before the dot).
    Revoke {
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// How long the token stays valid, e.g. 1h, 30m, 2d.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: u64,
    /// How many workers may enroll with it.
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    /// A note for `drover token list` (e.g. "rack 3").
    #[arg(long)]
    pub label: Option<String>,
    /// The worker name it enrolls (default: the name the worker asks for, usually its host
    /// name, which must not be taken). Needed to re-enroll an existing or reinstated worker.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub json: JsonArg,
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    parse_duration(s).map_err(|e| format!("{e} (e.g. --ttl 1h)"))
}

async fn ask(s: &Resolved, req: OperatorRequest) -> Result<OperatorResponse, CliError> {
    let mut client = OperatorClient::connect(s).await?;
    let answer = client.ask(&req).await;
    client.close().await;
    answer
}

fn unexpected(r: OperatorResponse) -> CliError {
    CliError::new(super::exit::FAILURE, format!("unexpected answer: {r:?}"))
}

fn json_out<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn token(cmd: TokenCommand) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Create(a) => {
            let s = settings::resolve(&a.conn)?;
            let req = OperatorRequest::CreateToken {
                ttl_ms: a.ttl,
                max_uses: a.uses,
                label: a.label,
                name: a.name,
            };
            match ask(&s, req).await? {
                OperatorResponse::TokenCreated {
                    token,
                    info,
                    ca_fingerprint,
                } => {
                    if a.json.json {
                        return json_out(&serde_json::json!({
                            "token": token, "ca_fingerprint": ca_fingerprint, "info": info,
                        }));
                    }
                    outln!("token:          {token}");
                    outln!("ca fingerprint: {ca_fingerprint}");
                    outln!("id:             {}", info.id);
                    outln!("uses:           {}", info.max_uses);
                    outln!(
                        "expires:        {}",
                        super::output::timestamp(info.expires_ms)
                    );
                    outln!();
                    outln!("On the new worker (as root):");
                    outln!(
                        "  drover-worker join --coordinator {} --ca-fingerprint {ca_fingerprint} --token {token}",
                        s.coordinator
                    );
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        TokenCommand::List { conn, json } => {
            let s = settings::resolve(&conn)?;
            match ask(&s, OperatorRequest::ListTokens).await? {
                OperatorResponse::Tokens(list) => {
                    if json.json {
                        return json_out(&list);
                    }
                    print_tokens(&list);
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        TokenCommand::Revoke { id, conn } => {
            let s = settings::resolve(&conn)?;
            match ask(&s, OperatorRequest::RevokeToken { id }).await? {
                OperatorResponse::TokenRevoked { id, changed } => {
                    match changed {
                        true => outln!("revoked join token {id}"),
                        false => outln!("join token {id} was already revoked"),
                    }
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
    }
}

fn print_tokens(list: &[TokenInfo]) {
    outln!(
        "{:<14} {:>5} {:<24} {:<16} LABEL",
        "ID",
        "USES",
        "EXPIRES",
        "NAME"
    );
    for t in list {
        outln!(
            "{:<14} {:>5} {:<24} {:<16} {}",
            t.id,
            format!("{}/{}", t.uses, t.max_uses),
            super::output::timestamp(t.expires_ms),
            t.name.as_deref().unwrap_or("-"),
            t.label.as_deref().unwrap_or("")
        );
    }
}

/// `drover worker revoke NAME` (`revoke` true) or `drover worker reinstate NAME`.
pub async fn revocation(
    name: String,
    revoke: bool,
    conn: ConnArgs,
    json: bool,
) -> Result<(), CliError> {
    let s = settings::resolve(&conn)?;
    let req = match revoke {
        true => OperatorRequest::RevokeWorker { name },
        false => OperatorRequest::ReinstateWorker { name },
    };
    match ask(&s, req).await? {
        OperatorResponse::Revocation(r) => {
            if json {
                return json_out(&r);
            }
            match (r.revoked, r.changed) {
                (true, _) => {
                    outln!(
                        "revoked worker {}: its certificates are refused from now on{}",
                        r.name,
                        if r.disconnected { "; its connection was closed" } else { "" }
                    );
                    outln!("to let the name enroll again: drover worker reinstate {}", r.name);
                }
                (false, true) => outln!(
                    "reinstated worker name {}: it may enroll again with a new token (drover token create --name {}); its old certificates stay refused",
                    r.name, r.name
                ),
                (false, false) => outln!("worker name {} was not revoked", r.name),
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}
