//! Dispatch of parsed commands to their handlers.

use super::client::OperatorClient;
use super::{
    exit, output, settings, CaCommand, CertCommand, Cli, CliError, Command, TlsCommand,
    WorkerCommand,
};
use crate::config::CoordinatorConfig;
use crate::pki::{self, CertRequest, Validity};
use crate::server::{ServeError, Server};
use drover_protocol::{ErrorKind, OperatorRequest, OperatorResponse};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Run a parsed command line to completion.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Dev(args) => super::dev::run(args).await,
        Command::Submit { args, conn } => {
            super::tasks::submit(&settings::resolve(&conn)?, args).await
        }
        Command::Events { args, conn } => {
            super::tasks::events(&settings::resolve(&conn)?, args).await
        }
        Command::Cancel { id, conn } => super::tasks::cancel(&settings::resolve(&conn)?, id).await,
        Command::Tasks { state, conn, json } => {
            let s = settings::resolve(&conn)?;
            match query(&s, OperatorRequest::ListTasks { state }).await? {
                OperatorResponse::Tasks(list) => {
                    let now = crate::clock::wall_ms();
                    print(json.json, &list, || super::tasks::tasks_table(&list, now))
                }
                other => Err(unexpected(other)),
            }
        }
        Command::Task(super::TaskCommand::Show { id, conn, json }) => {
            super::tasks::show(&settings::resolve(&conn)?, id, json.json).await
        }
        Command::Outputs { args, conn } => {
            super::tasks::outputs(&settings::resolve(&conn)?, args).await
        }
        Command::Tls(cmd) => tls(cmd),
        Command::Token(cmd) => super::trust::token(cmd).await,
        Command::Secret(cmd) => super::secret::secret(cmd).await,
        Command::Worker(WorkerCommand::Revoke { name, conn, json }) => {
            super::trust::revocation(name, true, conn, json.json).await
        }
        Command::Worker(WorkerCommand::Reinstate { name, conn, json }) => {
            super::trust::revocation(name, false, conn, json.json).await
        }
        Command::Manpages { dir } => {
            std::fs::create_dir_all(&dir)?;
            // One page per visible (sub)command: drover.1, drover-serve.1, drover-tls-ca-create.1 ...
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, &dir)?;
            Ok(())
        }
        Command::Status(args) => {
            super::ops::status(&settings::resolve(&args.conn)?, args.json.json).await
        }
        Command::Drain(args) => super::ops::drain(&settings::resolve(&args.conn)?, args).await,
        Command::Undrain(args) => super::ops::undrain(&settings::resolve(&args.conn)?, args).await,
        Command::Workers(args) => {
            let s = settings::resolve(&args.conn)?;
            let req = OperatorRequest::ListWorkers {
                state: args.state,
                label: args.label,
            };
            match query(&s, req).await? {
                OperatorResponse::Workers(list) => {
                    print(args.json.json, &list, || output::workers(&list))
                }
                other => Err(unexpected(other)),
            }
        }
        Command::Worker(WorkerCommand::Show { name, conn, json }) => {
            let s = settings::resolve(&conn)?;
            match query(&s, OperatorRequest::ShowWorker { name }).await? {
                OperatorResponse::Worker(w) => {
                    let now = w.last_heartbeat_ms + w.last_heartbeat_age_ms;
                    // Drain and running attempts, from the attention list (human output only).
                    let note = match json.json {
                        false => super::ops::note(&s, &w.name).await,
                        true => None,
                    };
                    print(json.json, &w, || {
                        output::worker(&w, now)
                            + &note
                                .map(|n| output::worker_note(&n, now))
                                .unwrap_or_default()
                    })
                }
                other => Err(unexpected(other)),
            }
        }
    }
}

async fn serve(args: super::ServeArgs) -> Result<(), CliError> {
    let config = CoordinatorConfig::load(&args.config_file)
        .map_err(|e| CliError::new(exit::CONFIG, e.to_string()))?;
    if args.print_config {
        out!("{}", toml::to_string_pretty(&config).unwrap_or_default());
        return Ok(());
    }
    let files = crate::pki::TlsFiles {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
    };
    let file = args.config_file.display();
    let server = Server::bind(config).map_err(|e| {
        let message = match &e {
            ServeError::Tls(tls) => match tls.config_key(&files) {
                Some(key) => format!("{file}: key `{key}`: {tls}"),
                None => format!("{file}: {e}"),
            },
            _ => e.to_string(),
        };
        CliError::new(e.exit_code(), message)
    })?;
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(drover_worker::shutdown_on_signal(shutdown.clone()));
    let result = server
        .run(shutdown)
        .await
        .map_err(|e| CliError::new(e.exit_code(), e.to_string()));
    signals.abort();
    result
}

fn tls(cmd: TlsCommand) -> Result<(), CliError> {
    match cmd {
        TlsCommand::Ca(CaCommand::Create { dir, name }) => {
            let paths = pki::create_ca(&dir, &name)?;
            outln!("created fleet CA\n  certificate  {}\n  key          {} (mode 0600; keep it offline if you can)", paths.cert.display(), paths.key.display());
            Ok(())
        }
        TlsCommand::Cert(CertCommand::Create {
            role,
            name,
            days,
            ca_dir,
            out_dir,
            san,
            force,
        }) => {
            if days == 0 {
                return Err(CliError::new(exit::USAGE, "--days must be at least 1"));
            }
            let out = out_dir.unwrap_or_else(|| ca_dir.clone());
            let req = CertRequest {
                role,
                name,
                validity: Validity::Days(days),
                extra_sans: san,
            };
            let paths = pki::issue_cert(&ca_dir, &out, &req, force)?;
            outln!(
                "issued {role} certificate {:?}, valid {days} days\n  certificate  {}\n  key          {} (mode 0600)",
                req.name,
                paths.cert.display(),
                paths.key.display()
            );
            Ok(())
        }
    }
}

async fn query(s: &settings::Resolved, req: OperatorRequest) -> Result<OperatorResponse, CliError> {
    let mut client = OperatorClient::connect(s).await?;
    let response = client.request(&req).await;
    client.close().await;
    match response? {
        OperatorResponse::Error { kind, message } => Err(error_response(kind, message)),
        other => Ok(other),
    }
}

/// The exit code an error answer maps to.
pub(super) fn error_response(kind: ErrorKind, message: String) -> CliError {
    let code = match kind {
        ErrorKind::NotFound | ErrorKind::Internal => exit::FAILURE,
        ErrorKind::InvalidRequest => exit::USAGE,
    };
    CliError::new(code, message)
}

fn print<T: Serialize>(
    json: bool,
    value: &T,
    human: impl FnOnce() -> String,
) -> Result<(), CliError> {
    if json {
        let text = serde_json::to_string_pretty(value)?;
        outln!("{text}");
    } else {
        out!("{}", human());
    }
    Ok(())
}

pub(super) fn unexpected(r: OperatorResponse) -> CliError {
    CliError::new(
        exit::FAILURE,
        format!("unexpected answer from the coordinator: {r:?}"),
    )
}
