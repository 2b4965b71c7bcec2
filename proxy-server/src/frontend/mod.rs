//! The kube-apiserver side of the server: `ProxyService` over gRPC
//! ([`grpc`]) and HTTP CONNECT ([`http_connect`]). Both turn requests into
//! [`crate::backend::registry::AgentRegistry::dial`] calls and relay bytes
//! through the resulting [`crate::tunnel::Tunnel`].

pub mod authority;
pub mod grpc;
pub mod http_connect;
