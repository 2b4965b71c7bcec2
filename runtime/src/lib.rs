//! Pieces `proxy-server` and `proxy-agent` both need, kept out of the protocol
//! crate because they touch sockets, files, clocks or the process:
//!
//! - [`tls`]: rustls configurations from PEM files, with errors that name the file, rebuilt
//!   when the files change on disk ([`tls::Reloading`]).
//! - [`pki`]: throw-away certificate authorities for the demo and the tests.
//! - [`addr`]: listener addresses from bind-address and port flags.
//! - [`admin`]: the `/healthz`, `/readyz`, `/metrics` HTTP endpoint.
//! - [`process`]: the process's own resident memory, open descriptors and tokio tasks as metrics.
//! - [`shutdown`]: first signal drains, second signal exits.
//! - [`logging`]: `tracing` set-up for text or JSON logs with klog-style verbosity.
//! - [`duration`]: flag values like `30s`, `1h`, `5m0s`; [`flag`]: Go-style booleans.

pub mod addr;
pub mod admin;
pub mod duration;
pub mod flag;
pub mod logging;
pub mod memory;
pub mod pki;
pub mod process;
pub mod shutdown;
pub mod tls;
