//! A Kubernetes client from `--kubeconfig`, or the in-cluster config when the
//! flag is empty (as upstream's `BuildConfigFromFlags("", "")` does).

use std::path::Path;

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig given and not running in a pod.
    #[error("no --kubeconfig and no in-cluster config: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    /// The client itself (TLS settings, proxy) could not be built.
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for `kubeconfig` (its current context), or in-cluster when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::incluster()?,
    };
    Ok(kube::Client::try_from(config)?)
}
