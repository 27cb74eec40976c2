//! `safeguard keys`: create, list and revoke API keys in the server's store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use safeguard_server::SCOPES;
use safeguard_store::{Migrations, Store, StoreOptions};

#[derive(clap::Args)]
pub struct StoreArgs {
    /// The server's --data-dir: its SQLite database is DIR/safeguard.db.
    #[arg(long, value_name = "DIR", default_value = "safeguard-data", env = "SAFEGUARD_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The server's --database instead (sqlite://FILE or postgres://…).
    #[arg(long, value_name = "URL", env = "SAFEGUARD_DATABASE_URL")]
    pub database: Option<String>,
    /// The PostgreSQL schema, as given to `safeguard serve`.
    #[arg(long, value_name = "NAME", env = "SAFEGUARD_DATABASE_SCHEMA")]
    pub database_schema: Option<String>,
}

impl StoreArgs {
    fn options(&self, migrations: Migrations) -> StoreOptions {
        StoreOptions { schema: self.database_schema.clone(), migrations, ..Default::default() }
    }

    /// The store a server started with the same flags would use, made if it does not exist yet: a key is made
    /// before the first start off loopback. A store that exists is opened as [`open`](Self::open) opens it.
    pub(super) async fn open_or_create(&self) -> anyhow::Result<Store> {
        if self.exists().await? {
            return self.open().await;
        }
        super::serve::open_store(&self.data_dir, self.database.as_deref(), self.options(Migrations::Apply)).await
    }

    /// A store that must exist already: listing or changing what a server stored in a database made just now
    /// (another directory, a mistyped --data-dir, --database or --database-schema) would find nothing and say so
    /// as if all were well. Only a server migrates: one of another version may be running on this store, and a
    /// store this version has not migrated is refused rather than changed under it.
    pub(super) async fn open(&self) -> anyhow::Result<Store> {
        if !self.exists().await? {
            let schema = self.database_schema.as_ref().map(|s| format!(" (schema {s})")).unwrap_or_default();
            bail!(
                "no database at {}{schema}: give the --data-dir (or --database) the server was started with",
                self.shown()
            );
        }
        super::serve::open_store(&self.data_dir, self.database.as_deref(), self.options(Migrations::RequireApplied))
            .await
    }

    async fn exists(&self) -> anyhow::Result<bool> {
        match &self.database {
            None => Ok(self.sqlite_path().exists()),
            Some(url) => safeguard_store::store_exists(url, self.database_schema.as_deref())
                .await
                .with_context(|| format!("cannot open the database {}", self.shown())),
        }
    }

    fn sqlite_path(&self) -> PathBuf {
        super::serve::sqlite_path(&self.data_dir)
    }

    /// Where this store is, as a person would look for it.
    fn shown(&self) -> String {
        match &self.database {
            Some(url) => safeguard_store::redact_url(url),
            None => self.sqlite_path().display().to_string(),
        }
    }
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a key and print it once; only its hash is stored.
    Create {
        /// classify, policies:write, review, audit, metrics or admin; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// The client the key is for. What a key submits belongs to every key of this name: a key made to replace
        /// another under the same name can still appeal its decisions and read its jobs. Without it the key gets
        /// a name of its own (`client-…`), shared with no other key.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List keys (ids, names, scopes; never the keys).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a key by id.
    Revoke {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    super::classify::runtime()?.block_on(async move {
        match command {
            Command::Create { scopes, name, store } => {
                if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
                    bail!("unknown scope {bad:?}; scopes are {}", SCOPES.join(", "));
                }
                let shown = store.shown();
                let store = store.open_or_create().await?;
                // Never one default shared by every key made without a name: that would make all their clients
                // one, each free to read the others' jobs and appeal their decisions.
                let name = name.unwrap_or_else(|| {
                    let id = safeguard_store::new_id();
                    format!("client-{}", &id[id.len() - 12..])
                });
                let (record, secret) = store.create_api_key(&name, &scopes).await?;
                eprintln!(
                    "created key {} ({}) with scopes {} in {shown}; it is shown only now:",
                    record.id,
                    record.name,
                    scopes.join(" ")
                );
                // The secret is shown once: a key whose secret never reached anyone is a key nobody holds, so it
                // is revoked rather than left active.
                let shown = {
                    use std::io::Write;
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "{secret}").and_then(|()| stdout.flush())
                };
                if let Err(error) = shown {
                    store.revoke_api_key(&record.id).await?;
                    bail!("cannot print the secret ({error}); key {} was revoked", record.id);
                }
            }
            Command::List { store } => {
                let store = store.open().await?;
                for key in store.list_api_keys().await? {
                    let state = if key.revoked_at.is_some() { "revoked" } else { "active" };
                    println!("{}\t{}\t{}\t{}", key.id, key.name, key.scopes.join(" "), state);
                }
            }
            Command::Revoke { id, store } => {
                let store = store.open().await?;
                if !store.revoke_api_key(&id).await? {
                    bail!("no active key with id {id}");
                }
                eprintln!("revoked {id}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
