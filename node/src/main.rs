//! `sampo`: the node binary.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sampo_node::config::{self, Config, Override};
use sampo_node::{keys, logging, service};

mod cmd_model;
mod cmd_testnet;
mod cmd_verify;

#[derive(Parser)]
#[command(name = "sampo", version, about = "A peer-to-peer node for verifiable LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where to read the configuration from, shared by subcommands that need it.
#[derive(clap::Args, Clone)]
struct ConfigArgs {
    /// TOML config file; defaults apply where it is silent.
    #[arg(long, short, env = "SAMPO_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    fn overrides(&self) -> Vec<Override> {
        let mut o = Vec::new();
        if let Some(d) = &self.data_dir {
            o.push(Override { key: "data_dir".into(), value: toml::Value::String(d.display().to_string()) });
        }
        o
    }

    fn load(&self, extra: Vec<Override>) -> anyhow::Result<Config> {
        let mut o = self.overrides();
        o.extend(extra);
        Ok(Config::load(self.config.as_deref(), std::env::vars(), &o)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Overrides `api.listen` (e.g. 127.0.0.1:0 for any free port).
        #[arg(long)]
        api_listen: Option<String>,
        /// Overrides `network.listen` (repeatable).
        #[arg(long)]
        listen: Vec<String>,
        /// Overrides `network.bootstrap` (repeatable).
        #[arg(long)]
        bootstrap: Vec<String>,
        /// Serve this GGUF model (repeatable; overrides `[[models]]`).
        #[arg(long)]
        model: Vec<PathBuf>,
        /// Accept a `[testing] behaviour` that misbehaves on purpose (testnets only).
        #[arg(long)]
        unsafe_allow_faults: bool,
    },
    /// Inspect, synthesize and run models locally.
    Model {
        #[command(subcommand)]
        cmd: cmd_model::ModelCmd,
    },
    /// Measure prefill and decode speed.
    Bench(cmd_model::BenchArgs),
    /// Check a saved evidence bundle offline and print the verdict or exactly what fails.
    Verify {
        /// The bundle: JSON from `GET /v1/tasks/{id}/evidence`, or raw envelope bytes.
        file: std::path::PathBuf,
        #[arg(long)]
        json: bool,
        /// Also re-execute the task: replay each member's revealed output on the model.
        #[arg(long, requires = "model")]
        replay: bool,
        /// The model file the task ran (its id must match the task's).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// CPU threads for the replay (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Start a local testnet of real node processes.
    Testnet(cmd_testnet::TestnetArgs),
    /// Manage the node's identity key.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Client accounts in the node's ledger (run while the node is stopped).
    Accounts {
        #[command(subcommand)]
        action: AccountsAction,
    },
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum AccountsAction {
    /// Credit an account (the bearer key's account is `key-` + 16 hex digits of its
    /// blake3 digest, as `GET /v1/account` shows; `local` when the node has no keys).
    Deposit {
        #[command(flatten)]
        cfg: ConfigArgs,
        name: String,
        amount: u64,
    },
    /// Show an account's balance, holds and recent charges.
    Show {
        #[command(flatten)]
        cfg: ConfigArgs,
        name: String,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create `<data_dir>/node.key` (mode 0600) and print the peer id.
    Generate {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Replace an existing key (the node's identity changes).
        #[arg(long)]
        force: bool,
    },
    /// Print the peer id and public key of the existing key.
    Show {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Issue an admission certificate for a closed network: sign a node's peer id with
    /// an issuer key listed in the nodes' `network.admission_keys`.
    Certify {
        /// The issuer's key file (an ordinary node key, mode 0600); its public key, from
        /// `sampo keys show`, is what nodes list in `network.admission_keys`.
        #[arg(long)]
        issuer_key: PathBuf,
        /// The peer id of the node to admit.
        #[arg(long)]
        subject: String,
        /// Days until the certificate expires.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Write the certificate here (the node's `network.certificate`); without it,
        /// print it as hex.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the commented default configuration.
    Default,
    /// Load and validate a configuration (file, SAMPO_* environment), then print it.
    Check {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

fn strings(key: &str, v: &[String]) -> Option<Override> {
    (!v.is_empty()).then(|| Override {
        key: key.into(),
        value: toml::Value::Array(v.iter().cloned().map(toml::Value::String).collect()),
    })
}

/// A user's error (bad config, a missing file, an unsupported model) is reported as the
/// error and its causes, as cargo does; backtraces are for panics, whatever
/// `RUST_BACKTRACE` says.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
            if !causes.is_empty() {
                eprintln!("\nCaused by:");
                for c in causes {
                    eprintln!("    {c}");
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Node { cfg, api_listen, listen, bootstrap, model, unsafe_allow_faults } => {
            let mut extra = Vec::new();
            if let Some(a) = api_listen {
                extra.push(Override { key: "api.listen".into(), value: toml::Value::String(a) });
            }
            extra.extend(strings("network.listen", &listen));
            extra.extend(strings("network.bootstrap", &bootstrap));
            if !model.is_empty() {
                let tables = model
                    .iter()
                    .map(|p| {
                        let mut t = toml::Table::new();
                        t.insert("path".into(), toml::Value::String(p.display().to_string()));
                        toml::Value::Table(t)
                    })
                    .collect();
                extra.push(Override { key: "models".into(), value: toml::Value::Array(tables) });
            }
            let config = cfg.load(extra)?;
            logging::init(config.log_format);
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if config.execution.runtime_threads > 0 {
                builder.worker_threads(config.execution.runtime_threads);
            }
            let rt = builder.enable_all().thread_name("sampo-rt").build().context("starting the async runtime")?;
            let opts = service::RunOptions { allow_faults: unsafe_allow_faults };
            rt.block_on(service::run_with(config, opts, service::shutdown_signal()))?;
        }
        Command::Model { cmd } => cmd_model::run(cmd)?,
        Command::Bench(args) => cmd_model::bench(args)?,
        Command::Verify { file, json, replay, model, threads } => {
            cmd_verify::run(&file, json, model.as_deref().filter(|_| replay), threads)?
        }
        Command::Testnet(args) => cmd_testnet::run(args)?,
        Command::Accounts { action: AccountsAction::Deposit { cfg, name, amount } } => {
            let config = cfg.load(Vec::new())?;
            let store = sampo_storage::Store::open(&config.db_path())
                .with_context(|| format!("opening {} (is the node running?)", config.db_path().display()))?;
            let a = store.deposit(&name, amount, sampo_node::runtime::now_ms())?;
            let (sum, deposits) = store.ledger_audit()?;
            println!("{name}: balance {} (held {}); ledger balances {sum} = deposits {deposits}", a.balance, a.held);
        }
        Command::Accounts { action: AccountsAction::Show { cfg, name } } => {
            let config = cfg.load(Vec::new())?;
            let store = sampo_storage::Store::open(&config.db_path())
                .with_context(|| format!("opening {} (is the node running?)", config.db_path().display()))?;
            let a = store.client_account(&name)?.unwrap_or_default();
            println!("{name}: balance {}, held {}", a.balance, a.held);
            for c in &a.recent {
                println!("  {} {:?} {} at {}", c.task, c.kind, c.amount, c.at_ms);
            }
        }
        Command::Keys { action: KeysAction::Generate { cfg, force } } => {
            let config = cfg.load(Vec::new())?;
            let key = keys::generate(&config.key_path(), force)?;
            println!("{}", key.peer_id());
            eprintln!("wrote {}", config.key_path().display());
        }
        Command::Keys { action: KeysAction::Show { cfg } } => {
            let config = cfg.load(Vec::new())?;
            let key = keys::load(&config.key_path())?;
            println!("peer_id: {}", key.peer_id());
            println!("public_key: {}", hex::encode(key.public()));
        }
        Command::Keys { action: KeysAction::Certify { issuer_key, subject, days, out } } => {
            let subject: sampo_node::admission::PeerId =
                subject.parse().map_err(|_| anyhow::anyhow!("--subject {subject:?} is not a peer id"))?;
            let now = sampo_node::runtime::now_ms();
            let cert = keys::certify(&issuer_key, subject, days, now)?;
            match out {
                Some(path) => {
                    keys::write_certificate(&path, &cert)?;
                    eprintln!("wrote {}", path.display());
                }
                None => println!("{}", hex::encode(cert.to_bytes())),
            }
            eprintln!("subject: {subject}");
            eprintln!("issuer: {}", hex::encode(cert.issuer));
            eprintln!("expires_ms: {}", cert.expires_ms);
        }
        Command::Config { action: ConfigAction::Default } => {
            print!("{}", config::DEFAULT_TOML);
        }
        Command::Config { action: ConfigAction::Check { cfg } } => {
            let config = cfg.load(Vec::new())?;
            print!("{}", toml::to_string_pretty(&config).context("printing the config")?);
            eprintln!("config ok");
        }
    }
    Ok(())
}
