//! Server Leases, as upstream publishes them: each server holds a Lease
//! `konnectivity-proxy-server-<serverID>` (holder = server ID, 30 s,
//! renewed about every 15 s), every server deletes expired Leases carrying
//! the label, and a server deletes its own on graceful shutdown. Agents count
//! the unexpired Leases to learn how many servers sit behind one address.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// `leaseDurationSeconds` of a server Lease.
pub const DURATION_SECS: i32 = 30;
/// Renewal period (plus up to [`JITTER`] of it).
pub const RENEW_EVERY: Duration = Duration::from_secs(15);
/// Expired-Lease collection period.
pub const GC_EVERY: Duration = Duration::from_secs(15);
/// Fraction of a period added at random, so servers do not write in step.
pub const JITTER: f64 = 0.1;
/// Retry delay after a failed renewal.
const RETRY: Duration = Duration::from_secs(1);
/// Deadline of each API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Name of the Lease of server `server_id`.
pub fn lease_name(server_id: &str) -> String {
    format!("konnectivity-proxy-server-{server_id}")
}

/// Parses `k=v,k2=v2` (the server's `--lease-label`) into labels.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        let ok = |t: &str| {
            t.len() <= 253
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        if k.is_empty() || !ok(k) || !ok(v) {
            return Err(format!("{pair:?} is not a valid label"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    if out.is_empty() {
        return Err("no labels".into());
    }
    Ok(out)
}

/// Label selector text for `labels`.
pub fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a Lease is unexpired at `now`: (renew time, else acquire time) +
/// duration is later than `now`. A Lease without either time or without a
/// duration is expired.
pub fn is_valid(spec: Option<&LeaseSpec>, now: Timestamp) -> bool {
    let Some(spec) = spec else { return false };
    let Some(since) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return false;
    };
    let Some(secs) = spec.lease_duration_seconds else {
        return false;
    };
    let Ok(until) = since.0.checked_add(jiff_secs(secs)) else {
        return false;
    };
    until > now
}

fn jiff_secs(secs: i32) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(i64::from(secs))
}

/// Counts unexpired Leases among `leases`; zero counts as one.
pub fn count_valid<'a>(leases: impl IntoIterator<Item = &'a LeaseSpec>, now: Timestamp) -> u32 {
    let n = leases
        .into_iter()
        .filter(|s| is_valid(Some(s), now))
        .count();
    (n as u32).max(1)
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 + JITTER * rand::random::<f64>())
}

/// Where and as whom a server publishes its Lease.
#[derive(Debug, Clone)]
pub struct PublishSettings {
    /// `--lease-namespace`.
    pub namespace: String,
    /// `--lease-label`.
    pub labels: BTreeMap<String, String>,
    /// The server ID (holder identity and name suffix).
    pub server_id: String,
}

/// Publishes this server's Lease and collects expired ones until `stop`;
/// then deletes its own Lease. Errors are logged and retried; they never end
/// the server.
pub async fn publish(client: kube::Client, s: PublishSettings, stop: CancellationToken) {
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    let name = lease_name(&s.server_id);
    info!(lease = %name, namespace = %s.namespace, "publishing the server lease");
    let mut next_renew = tokio::time::Instant::now();
    let mut next_gc = tokio::time::Instant::now() + jittered(GC_EVERY);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_renew) => {
                next_renew = match call(renew(&api, &name, &s)).await {
                    Ok(()) => tokio::time::Instant::now() + jittered(RENEW_EVERY),
                    Err(e) => {
                        warn!(lease = %name, error = %e, "cannot renew the server lease");
                        tokio::time::Instant::now() + RETRY
                    }
                };
            }
            _ = tokio::time::sleep_until(next_gc) => {
                if let Err(e) = call(collect(&api, &s.labels)).await {
                    warn!(error = %e, "cannot collect expired server leases");
                }
                next_gc = tokio::time::Instant::now() + jittered(GC_EVERY);
            }
            _ = stop.cancelled() => break,
        }
    }
    match call(async {
        api.delete(&name, &DeleteParams::default())
            .await
            .map(|_| ())
    })
    .await
    {
        Ok(()) => info!(lease = %name, "server lease deleted"),
        Err(e) => {
            warn!(lease = %name, error = %e, "cannot delete the server lease; it expires by itself")
        }
    }
}

async fn call<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

async fn renew(api: &Api<Lease>, name: &str, s: &PublishSettings) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    match api.get_opt(name).await? {
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(&s.server_id) {
                spec.holder_identity = Some(s.server_id.clone());
                spec.acquire_time = Some(now.clone());
            }
            spec.lease_duration_seconds = Some(DURATION_SECS);
            spec.renew_time = Some(now);
            let labels = lease.metadata.labels.get_or_insert_with(Default::default);
            labels.extend(s.labels.clone());
            // resourceVersion from the get: a concurrent writer makes this a
            // conflict, retried at the next attempt.
            api.replace(name, &PostParams::default(), &lease).await?;
            debug!(lease = %name, "server lease renewed");
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    labels: Some(s.labels.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(s.server_id.clone()),
                    lease_duration_seconds: Some(DURATION_SECS),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await?;
            info!(lease = %name, "server lease created");
        }
    }
    Ok(())
}

async fn collect(api: &Api<Lease>, labels: &BTreeMap<String, String>) -> Result<(), kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&selector(labels)))
        .await?;
    let now = Timestamp::now();
    for lease in list.items {
        if is_valid(lease.spec.as_ref(), now) {
            continue;
        }
        let Some(name) = lease.metadata.name.clone() else {
            continue;
        };
        // Only the version we judged expired: a renewal in between wins.
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: None,
            }),
            ..Default::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => info!(lease = %name, "expired server lease deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => warn!(lease = %name, error = %e, "cannot delete an expired server lease"),
        }
    }
    Ok(())
}

/// Where agents look for server Leases.
#[derive(Debug, Clone)]
pub struct CountSettings {
    /// `--lease-namespace`.
    pub namespace: String,
    /// `--lease-label` / `--lease-label-selector`.
    pub selector: String,
}

/// The number of unexpired server Leases, kept current by a watch.
#[derive(Debug, Clone)]
pub struct LeaseCount {
    rx: watch::Receiver<u32>,
}

impl LeaseCount {
    /// Starts watching; the count starts at one and the task ends with `stop`.
    pub fn start(client: kube::Client, s: CountSettings, stop: CancellationToken) -> Self {
        let (tx, rx) = watch::channel(1);
        tokio::spawn(async move {
            tokio::select! {
                _ = count_leases(client, s, tx) => {}
                _ = stop.cancelled() => {}
            }
        });
        LeaseCount { rx }
    }

    /// The current count (at least one).
    pub fn get(&self) -> u32 {
        *self.rx.borrow()
    }

    /// Waits until the count changes; returns the new count. Pending forever
    /// once the watch task has ended.
    pub async fn changed(&mut self) -> u32 {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.rx.borrow_and_update()
    }
}

/// The agent's view of the server Leases, fed by watch events. Written
/// without the watch itself so it is tested without a cluster.
#[derive(Debug, Default)]
pub struct LeaseView {
    leases: BTreeMap<String, LeaseSpec>,
    /// A relist in progress: replaces `leases` when done.
    listing: Option<BTreeMap<String, LeaseSpec>>,
    /// The view is current (listed, and no error since).
    healthy: bool,
}

impl LeaseView {
    /// Applies one watch event; an error marks the view stale until the
    /// next relist or event (a watch resumed after an error needs no relist:
    /// its events, renewals every ~15 s, show it is current again).
    pub fn apply<E: std::fmt::Display>(&mut self, ev: Result<watcher::Event<Lease>, E>) {
        let was = self.healthy;
        match ev {
            Ok(watcher::Event::Init) => self.listing = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(l)) => {
                if let Some(buf) = self.listing.as_mut() {
                    insert(buf, l);
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(buf) = self.listing.take() {
                    self.leases = buf;
                }
                self.healthy = true;
            }
            Ok(watcher::Event::Apply(l)) => {
                debug!(lease = ?l.metadata.name, renew_time = ?l.spec.as_ref().and_then(|s| s.renew_time.as_ref()).map(|t| t.0), "server lease changed");
                insert(&mut self.leases, l);
                self.healthy = self.listing.is_none();
            }
            Ok(watcher::Event::Delete(l)) => {
                debug!(lease = ?l.metadata.name, "server lease deleted");
                if let Some(name) = l.metadata.name {
                    self.leases.remove(&name);
                }
                self.healthy = self.listing.is_none();
            }
            Err(e) => {
                if was {
                    warn!(error = %e, "server lease watch failed; keeping the last count");
                }
                self.healthy = false;
            }
        }
        if self.healthy && !was {
            info!("server lease watch in sync");
        }
    }

    /// The count at `now`, or `None` while the view is stale (the caller
    /// keeps the last good count).
    ///
    /// Expiry is judged against the newest renewal seen (when older than
    /// `now`), not against the local clock alone: a Lease has expired once
    /// another server has renewed a full duration after it. While
    /// kube-apiserver accepts no renewals (down, terminating, its storage
    /// stalled) no Lease expires, so agents do not drop to one server; a
    /// server that died shows as expired as soon as the living ones renew.
    pub fn count(&self, now: Timestamp) -> Option<u32> {
        let newest = self
            .leases
            .values()
            .filter_map(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
            .map(|t| t.0)
            .max();
        let at = newest.map_or(now, |n| n.min(now));
        self.healthy.then(|| count_valid(self.leases.values(), at))
    }
}

/// Feeds the watch into a [`LeaseView`] and republishes its count on every
/// event and every second (Leases expire without an event).
async fn count_leases(client: kube::Client, s: CountSettings, tx: watch::Sender<u32>) {
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    let cfg = watcher::Config::default().labels(&s.selector);
    let mut events = watcher(api, cfg).default_backoff().boxed();
    let mut view = LeaseView::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    info!(namespace = %s.namespace, selector = %s.selector, "counting server leases");
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => view.apply(ev),
                None => return,
            },
            _ = tick.tick() => {}
        }
        if let Some(n) = view.count(Timestamp::now()) {
            tx.send_if_modified(|c| {
                if *c != n {
                    info!(from = *c, to = n, "server count from leases changed");
                    *c = n;
                    true
                } else {
                    false
                }
            });
        }
    }
}

fn insert(map: &mut BTreeMap<String, LeaseSpec>, l: Lease) {
    if let Some(name) = l.metadata.name {
        map.insert(name, l.spec.unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(renew_ago: Option<i64>, acquire_ago: Option<i64>, dur: Option<i32>) -> LeaseSpec {
        let now = Timestamp::now();
        let ago = |s: i64| {
            MicroTime(
                now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s))
                    .unwrap(),
            )
        };
        LeaseSpec {
            renew_time: renew_ago.map(ago),
            acquire_time: acquire_ago.map(ago),
            lease_duration_seconds: dur,
            ..Default::default()
        }
    }

    #[test]
    fn validity_follows_renew_then_acquire_time() {
        let now = Timestamp::now();
        assert!(is_valid(Some(&spec(Some(1), None, Some(30))), now));
        assert!(!is_valid(Some(&spec(Some(31), None, Some(30))), now));
        assert!(is_valid(Some(&spec(None, Some(1), Some(30))), now));
        // The renew time wins over an old acquire time.
        assert!(is_valid(Some(&spec(Some(1), Some(100), Some(30))), now));
        assert!(!is_valid(Some(&spec(Some(100), Some(1), Some(30))), now));
        // No time or no duration: expired (upstream would dereference nil).
        assert!(!is_valid(Some(&spec(None, None, Some(30))), now));
        assert!(!is_valid(Some(&spec(Some(1), None, None)), now));
        assert!(!is_valid(None, now));
    }

    #[test]
    fn zero_valid_leases_count_as_one() {
        let now = Timestamp::now();
        let live = spec(Some(1), None, Some(30));
        let dead = spec(Some(60), None, Some(30));
        assert_eq!(count_valid([&live, &live, &dead], now), 2);
        assert_eq!(count_valid([&dead], now), 1);
        assert_eq!(count_valid([], now), 1);
    }

    fn lease(name: &str, renew_ago: i64) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(spec(Some(renew_ago), None, Some(30))),
        }
    }

    type Ev = Result<watcher::Event<Lease>, &'static str>;

    #[test]
    fn the_view_counts_after_a_listing_and_keeps_its_count_while_stale() {
        let now = Timestamp::now;
        let mut v = LeaseView::default();
        assert_eq!(v.count(now()), None, "nothing listed yet");
        v.apply(Ev::Ok(watcher::Event::Init));
        v.apply(Ev::Ok(watcher::Event::InitApply(lease("a", 1))));
        v.apply(Ev::Ok(watcher::Event::InitApply(lease("b", 1))));
        v.apply(Ev::Ok(watcher::Event::InitApply(lease("old", 100))));
        assert_eq!(v.count(now()), None, "a listing counts once complete");
        v.apply(Ev::Ok(watcher::Event::InitDone));
        assert_eq!(v.count(now()), Some(2), "the expired Lease is not counted");
        v.apply(Ev::Ok(watcher::Event::Apply(lease("c", 0))));
        assert_eq!(v.count(now()), Some(3));
        // No renewals for a minute (kube-apiserver stalled, the watch still
        // open): judged against the newest renewal, nothing has expired.
        let later = now()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(60))
            .unwrap();
        assert_eq!(v.count(later), Some(3));
        // One server renews a full duration after "a" and "b": they expired.
        v.apply(Ev::Ok(watcher::Event::Apply(lease("c", -31))));
        assert_eq!(v.count(later), Some(1));
        v.apply(Ev::Ok(watcher::Event::Apply(lease("c", 0))));
        v.apply(Ev::Err("connection refused"));
        assert_eq!(v.count(now()), None, "stale: the caller keeps 3");
        // The watch resumes without a relist: the next event is current.
        v.apply(Ev::Ok(watcher::Event::Delete(lease("c", 0))));
        assert_eq!(v.count(now()), Some(2));
        // A relist replaces everything seen before.
        v.apply(Ev::Ok(watcher::Event::Init));
        v.apply(Ev::Ok(watcher::Event::InitApply(lease("z", 1))));
        v.apply(Ev::Ok(watcher::Event::InitDone));
        assert_eq!(v.count(now()), Some(1));
    }

    #[test]
    fn labels_parse_like_upstream() {
        let l = parse_labels("k8s-app=konnectivity-server").unwrap();
        assert_eq!(selector(&l), "k8s-app=konnectivity-server");
        let l = parse_labels("a=1, b=two").unwrap();
        assert_eq!(l.len(), 2);
        assert!(parse_labels("").is_err());
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("a b=c").is_err());
        assert_eq!(lease_name("s1"), "konnectivity-proxy-server-s1");
    }
}
