//! The Kubernetes API parts of the tunnel, kept out of the core so the
//! protocol, relay and agent choice never depend on a Kubernetes client.
//!
//! - [`mod@client`]: a client from a kubeconfig file or the in-cluster config.
//! - [`token_review`]: the server admits agents whose service-account token
//!   kube-apiserver vouches for (TokenReview), with a bounded positive cache.
//! - [`node`]: the kubelet endpoint kube-apiserver would dial for a node.
//! - [`lease`]: the server publishes, renews and collects Leases; agents
//!   count the unexpired ones to know how many servers to hold streams to.

pub mod client;
pub mod lease;
pub mod node;
pub mod token_review;

pub use client::client;
pub use kube::Client;
