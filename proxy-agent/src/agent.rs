//! The agent's supervisor: through one address, holds a stream to each
//! server (counted by `serverCount` or by the server Leases), redialing with
//! exponential backoff and jitter, and drains on shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use backon::BackoffBuilder;
use konnectivity_kube::lease::{self, LeaseCount};
use konnectivity_runtime::admin::{self, AdminState};
use konnectivity_runtime::shutdown::Shutdown;
use konnectivity_runtime::tls;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{debug, info, warn, Instrument};

use crate::config::Config;
use crate::diagnostics;
use crate::metrics::Metrics;
use crate::stream::{self, ServerLink, Settings};

/// An agent whose health and admin listeners are bound.
pub struct BoundAgent {
    settings: Arc<Settings>,
    health: TcpListener,
    admin: Option<TcpListener>,
    kube: Option<konnectivity_kube::Client>,
}

impl BoundAgent {
    /// The bound health address.
    pub fn health_addr(&self) -> SocketAddr {
        self.health.local_addr().expect("bound")
    }
    /// The agent's metrics.
    pub fn metrics(&self) -> Metrics {
        self.settings.metrics.clone()
    }
}

/// Validates TLS material and binds the health and admin listeners.
pub async fn bind(config: Config) -> anyhow::Result<BoundAgent> {
    let tls = {
        let id = config
            .server
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let alpn: Vec<&[u8]> = config.server.alpn.iter().map(Vec::as_slice).collect();
        tls::Reloading::client("server connection", &config.server.ca_cert, id, &alpn)
            .context("agent TLS")?
    };
    let health = TcpListener::bind(&config.health_addr)
        .await
        .with_context(|| format!("bind health listener on {}", config.health_addr))?;
    let admin = match &config.admin_addr {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("bind admin listener on {a}"))?,
        ),
        None => None,
    };
    let kube = match &config.leases {
        Some(l) => Some(konnectivity_kube::client(l.kubeconfig.as_deref()).await?),
        None => None,
    };
    Ok(BoundAgent {
        kube,
        settings: Arc::new(Settings {
            config,
            tls,
            metrics: Metrics::new(),
            events: Default::default(),
            quic: Default::default(),
        }),
        health,
        admin,
    })
}

/// Binds and runs until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    bind(config).await?.run(shutdown).await
}

/// While draining, how long the agent must have had nothing open before it
/// leaves early (dials may still arrive until the server has seen `DRAIN`).
const DRAIN_SETTLE: Duration = Duration::from_secs(2);

type Links = Arc<Mutex<HashMap<String, Arc<ServerLink>>>>;

fn lock(links: &Links) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServerLink>>> {
    links.lock().unwrap_or_else(|e| e.into_inner())
}

impl BoundAgent {
    /// Runs the agent: keeps server streams, serves health. On the graceful
    /// signal it sends `DRAIN` on every stream, opens no new streams, lets open
    /// connections finish for `--grace-period`, then exits.
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let s = self.settings.clone();
        let cfg = &s.config;
        info!(
            version = env!("CARGO_PKG_VERSION"),
            agent.id = %cfg.agent_id,
            server = %format!("{}:{}", cfg.server.host, cfg.server.port),
            health = %self.health_addr(),
            admin = ?self.admin.as_ref().and_then(|a| a.local_addr().ok()),
            identifiers = %cfg.identifiers.encode(),
            allowed_destinations = %cfg.allowed,
            "proxy-agent started"
        );
        let links: Links = Arc::default();
        let ready_metrics = s.metrics.clone();
        let state = AdminState {
            registry: Arc::new(s.metrics.registry.clone()),
            ready: Arc::new(move || {
                if ready_metrics.open_server_connections.get() > 0 {
                    Ok(())
                } else {
                    Err("no servers connected".into())
                }
            }),
            debug: None,
        };
        let (debug_links, debug_settings) = (links.clone(), s.clone());
        let debug: admin::DebugFn = Arc::new(move |path, _query| {
            let links: Vec<Arc<ServerLink>> = lock(&debug_links).values().cloned().collect();
            let s = &debug_settings;
            diagnostics::render(&s.config.agent_id, &links, &s.events, path)
                .map(|v| Ok(v.to_string()))
        });
        let stop_all = shutdown.immediate.clone();
        admin::spawn(self.health, self.admin, state, debug, stop_all.clone());
        let open = s.metrics.open_endpoint_connections.clone();
        tokio::spawn(konnectivity_runtime::memory::trim_after_bursts(
            move || open.get(),
            stop_all.clone(),
        ));

        let leases = match (&cfg.leases, self.kube) {
            (Some(l), Some(client)) => Some(LeaseCount::start(
                client,
                lease::CountSettings {
                    namespace: l.namespace.clone(),
                    selector: l.selector.clone(),
                },
                stop_all.clone(),
            )),
            _ => None,
        };
        supervise(&s, &links, leases, &shutdown).await;

        // Drain: announce, keep serving (the server still sends dials here when
        // it has no other agent), and leave once nothing has been open for
        // DRAIN_SETTLE, or when the grace period ends.
        let held: Vec<_> = lock(&links).values().cloned().collect();
        info!(streams = held.len(), grace_period = ?cfg.grace_period, "draining");
        for l in &held {
            l.drain().await;
        }
        let deadline = tokio::time::Instant::now() + cfg.grace_period;
        let mut idle_since = tokio::time::Instant::now();
        loop {
            let busy: usize = held.iter().map(|l| l.busy()).sum();
            let now = tokio::time::Instant::now();
            if busy > 0 {
                idle_since = now;
            } else if now.duration_since(idle_since) >= DRAIN_SETTLE {
                break;
            }
            if now >= deadline {
                warn!(
                    open = busy,
                    "grace period over; cutting off open connections"
                );
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.immediate.cancelled() => {
                    warn!(open = busy, "second signal; cutting off open connections");
                    break;
                }
            }
        }
        shutdown.now();
        info!("proxy-agent stopped");
        Ok(())
    }
}

fn backoff(cfg: &Config) -> impl Iterator<Item = Duration> {
    delays(cfg.sync_interval, cfg.sync_interval_cap)
}

/// Exponential delays from `min`, doubling up to `max`, each plus a random
/// jitter of up to its own length (backon's). The jitter generator
/// is seeded per process and per sequence (backon's `std` feature): with a
/// fixed seed every agent of a fleet would retry in lockstep after a server
/// restart.
fn delays(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The number of servers to hold streams to: the servers' `serverCount`
/// (the latest, or with `max` the largest seen), or the lease count, or with
/// `max` the larger of the two.
fn target(from_responses: u32, leases: Option<u32>, max: bool) -> u32 {
    match leases {
        None => from_responses,
        Some(l) if max => l.max(from_responses),
        Some(l) => l,
    }
    .max(1)
}

/// Keeps that many distinct server streams until the graceful signal.
async fn supervise(
    s: &Arc<Settings>,
    links: &Links,
    mut leases: Option<LeaseCount>,
    shutdown: &Shutdown,
) {
    let cfg = &s.config;
    let m = &s.metrics;
    let changed = Arc::new(Notify::new());
    let mut from_responses: u32 = 1;
    let mut delays = backoff(cfg);
    loop {
        let want = target(
            from_responses,
            leases.as_ref().map(LeaseCount::get),
            cfg.server_count_max,
        );
        m.known_server_count.set(want as i64);
        let held = lock(links).len() as u32;
        if held >= want {
            // All held: wait for a stream to end or the lease count to
            // change (or, with --sync-forever, probe for servers we do not
            // know yet).
            let probe = cfg.sync_forever;
            tokio::select! {
                _ = changed.notified() => continue,
                _ = async { leases.as_mut().expect("guarded").changed().await }, if leases.is_some() => continue,
                _ = shutdown.graceful.cancelled() => return,
                _ = tokio::time::sleep(cfg.sync_interval_cap), if probe => {}
            }
        }
        let opened = tokio::select! {
            r = stream::open(s) => r,
            _ = shutdown.graceful.cancelled() => return,
        };
        let wait = match opened {
            Ok(opened) => {
                let count = opened.server_count;
                from_responses = if cfg.server_count_max {
                    from_responses.max(count)
                } else {
                    count
                };
                let id = opened.server_id.clone();
                let duplicate = {
                    let mut l = lock(links);
                    if l.contains_key(&id) {
                        true
                    } else {
                        l.insert(id.clone(), opened.link.clone());
                        false
                    }
                };
                if duplicate {
                    debug!(server.id = %id, "already connected to this server; dropping the extra stream");
                    drop(opened);
                    delays.next()
                } else {
                    info!(server.id = %id, server_count = count, flow_control = opened.link.flow, quic_offered = opened.quic.is_some(), "connected to proxy server");
                    m.open_server_connections.inc();
                    delays = backoff(cfg);
                    let links = links.clone();
                    let changed = changed.clone();
                    let m = m.clone();
                    let stop = shutdown.immediate.clone();
                    let span = tracing::info_span!("server", server.id = %id);
                    tokio::spawn(
                        async move {
                            opened.serve(stop).await;
                            lock(&links).remove(&id);
                            m.open_server_connections.dec();
                            changed.notify_one();
                        }
                        .instrument(span),
                    );
                    None
                }
            }
            Err(e) => {
                m.server_connection_failures
                    .with_label_values(&[e.reason()])
                    .inc();
                let d = delays.next();
                warn!(error = %e, retry_in = ?d, "cannot open a stream to the proxy server");
                s.events.stream_failed(e.reason(), &e.to_string());
                d
            }
        };
        if let Some(d) = wait {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = shutdown.graceful.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_count_sources_combine_like_upstream() {
        assert_eq!(target(3, None, false), 3, "serverCount alone");
        assert_eq!(target(0, None, false), 1, "zero counts as one");
        assert_eq!(target(1, Some(3), false), 3, "leases win by default");
        assert_eq!(target(5, Some(3), false), 3);
        assert_eq!(target(5, Some(3), true), 5, "max takes the larger");
        assert_eq!(target(1, Some(3), true), 3);
    }

    #[test]
    fn backoff_jitter_differs_between_sequences() {
        let a: Vec<Duration> = delays(Duration::from_secs(1), Duration::from_secs(10))
            .take(6)
            .collect();
        let b: Vec<Duration> = delays(Duration::from_secs(1), Duration::from_secs(10))
            .take(6)
            .collect();
        assert_ne!(a, b, "two agents would retry in lockstep");
        assert!(a.iter().all(|d| *d >= Duration::from_secs(1)));
    }
}
