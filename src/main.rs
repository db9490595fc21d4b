//! The `ballast` command line: parse arguments, install logging, build the runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ballast::config::Config;

#[derive(Parser)]
#[command(name = "ballast", version, about = "An L4/L7 load balancer daemon")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, value_name = "FILE", required = false)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 if valid, 1 with every error otherwise.
    #[arg(long, requires = "config")]
    check: bool,
    /// Take the listening sockets over from the running ballast at `global.handover_socket`
    /// (zero-downtime binary upgrade); it drains and exits once this process is ready.
    #[arg(long, requires = "config")]
    upgrade: bool,
    /// Log filter, e.g. "info" or "ballast=debug" (overrides RUST_LOG).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start three built-in demo backends and ballast in front of them.
    Demo {
        /// Address for the demo listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
        /// Address of the admin endpoint: status page, /metrics, /status (loopback only).
        #[arg(long, default_value = "127.0.0.1:9000")]
        admin: SocketAddr,
    },
    /// Run one demo backend that answers with its host name (a container's ID), until
    /// SIGTERM; the replica of the docker-compose blueprint.
    DemoBackend {
        #[arg(long, default_value = "0.0.0.0:8000")]
        bind: SocketAddr,
        /// After SIGTERM, keep serving this long while /health fails, then drain.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        lame_duck: std::time::Duration,
    },
    /// Request an http:// URL once; exit 0 on a 2xx answer, 1 otherwise (container health
    /// checks and hooks: the image has no curl).
    Probe {
        url: String,
        /// e.g. POST, for `/lame-duck` in a preStop hook.
        #[arg(long, default_value = "GET")]
        method: http::Method,
        /// Print the response body (e.g. the admin endpoint's /status) instead of the status.
        #[arg(long)]
        body: bool,
        /// Give up after this long, e.g. "2s".
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Send `Authorization: Bearer <token>` with the token read from FILE (the admin
        /// token's secret file, e.g. /run/secrets/ballast-admin-token).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// An extra request header, "Name: value"; may be repeated.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
    },
}

/// glibc's allocator kept ~80 MB resident after a soak of slow clients ended (per-thread
/// arenas hold freed pages); jemalloc with its background purging threads returns freed
/// pages to the OS within seconds. Figures: BENCHMARKS.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read from this symbol when it starts (its `malloc_conf`; the
/// `_RJEM_MALLOC_CONF` variable still overrides them). Each thread caches at least 128
/// freed blocks of a small size class, not 20: with 64 requests in flight, their boxed
/// futures and buffers overflowed the cache on every burst and went back to the arena
/// through its locks (callgrind at 64 clients: 23,472 -> 20,677 instructions a request;
/// BENCHMARKS.md, issue 24 sixth pass). A C `const char *`: a thin pointer to the bytes.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 28] = b"tcache_nslots_small_min:128\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Flushes what is still queued when main returns.
    let _log_flush = ballast::logging::init(cli.log.as_deref());
    raise_fd_limit();

    let (config, path) = match (&cli.command, &cli.config) {
        (Some(Command::Demo { bind, admin }), _) => {
            let (bind, admin) = (*bind, *admin);
            return block_on(None, async move {
                ballast::demo::run(bind, admin)
                    .await
                    .map_err(|e| e.to_string())
            });
        }
        (Some(Command::DemoBackend { bind, lame_duck }), _) => {
            let (bind, lame_duck) = (*bind, *lame_duck);
            return block_on(Some(1), async move {
                ballast::demo::run_backend(bind, lame_duck)
                    .await
                    .map_err(|e| e.to_string())
            });
        }
        (
            Some(Command::Probe {
                url,
                method,
                body,
                timeout,
                token_file,
                headers,
            }),
            _,
        ) => {
            let (url, method, timeout, print_body) = (url.clone(), method.clone(), *timeout, *body);
            let headers = match ballast::probe::request_headers(headers, token_file.as_deref()) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("probe: {e}");
                    return ExitCode::from(2);
                }
            };
            return block_on(Some(1), async move {
                match ballast::probe::probe(method, &url, headers, timeout).await {
                    Ok(answer) if print_body => {
                        use std::io::Write;
                        let _ = std::io::stdout().write_all(&answer.body);
                        Ok(())
                    }
                    Ok(answer) => {
                        println!("{url}: {}", answer.status);
                        Ok(())
                    }
                    Err(e) => Err(format!("probe {url}: {e}")),
                }
            });
        }
        (None, Some(path)) => match Config::load(path) {
            Ok(c) => (c, path.clone()),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => {
            eprintln!("ballast: --config FILE is required (or try `ballast demo`); see --help");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        for w in config.warnings() {
            eprintln!("{}: warning: {w}", path.display());
        }
        println!("{}: ok: {}", path.display(), config.summary());
        // Names only: a value may be a secret.
        if !config.env_vars.is_empty() {
            println!(
                "{}: environment variables read: {}",
                path.display(),
                config.env_vars.join(", ")
            );
        }
        let files = config.referenced_files();
        if !files.is_empty() {
            let files: Vec<_> = files.iter().map(|f| f.display().to_string()).collect();
            println!("{}: files read: {}", path.display(), files.join(", "));
        }
        return ExitCode::SUCCESS;
    }
    let workers = config.global.worker_threads;
    let upgrade = cli.upgrade;
    block_on(workers, async move {
        ballast::app::run(config, Some(path), upgrade)
            .await
            .map_err(|e| e.to_string())
    })
}

fn block_on(
    workers: Option<usize>,
    fut: impl std::future::Future<Output = Result<(), String>>,
) -> ExitCode {
    // One worker: a current-thread runtime skips the work-stealing machinery entirely.
    let mut rt = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all();
    if let Some(n) = workers.filter(|n| *n > 1) {
        rt.worker_threads(n);
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ballast: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ballast: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Every connection costs a file descriptor (two when proxied), and the usual soft limit of
/// 1024 is far below `max_connections`: raise the soft limit to the hard one, as nginx's
/// `worker_rlimit_nofile` and Go's runtime do.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = ?limit.current, to = ?limit.maximum, "raised the open-file limit")
        }
        Err(e) => {
            tracing::warn!(error = %e, soft = ?limit.current, "cannot raise the open-file limit")
        }
    }
}
