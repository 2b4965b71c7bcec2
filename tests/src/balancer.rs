//! A TCP load balancer for the tests, as a Kubernetes Service would be in
//! front of several servers: each new connection goes to the next backend in
//! turn that is in rotation and accepts it; bytes are then copied both ways.
//! Taking a backend out of rotation (its pod turned not-ready or is
//! terminating) affects new connections only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};

/// A running balancer on a loopback address, port 0.
pub struct Balancer {
    /// Where clients connect.
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<(SocketAddr, bool)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Balances over `backends`, all in rotation, on 127.0.0.1.
    pub async fn start(backends: &[SocketAddr]) -> Balancer {
        Self::start_on("127.0.0.1", backends).await
    }

    /// [`Balancer::start`] on another loopback address (127.0.0.2, ...).
    pub async fn start_on(ip: &str, backends: &[SocketAddr]) -> Balancer {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let list = Arc::new(Mutex::new(
            backends.iter().map(|b| (*b, true)).collect::<Vec<_>>(),
        ));
        let next = Arc::new(AtomicUsize::new(0));
        let shared = list.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (list, next) = (shared.clone(), next.clone());
                tokio::spawn(async move {
                    let candidates: Vec<SocketAddr> = {
                        let l = list.lock().expect("backends");
                        let start = next.fetch_add(1, Ordering::Relaxed);
                        (0..l.len())
                            .map(|k| l[(start + k) % l.len()])
                            .filter(|(_, on)| *on)
                            .map(|(a, _)| a)
                            .collect()
                    };
                    for b in candidates {
                        if let Ok(mut server) = TcpStream::connect(b).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer {
            addr,
            backends: list,
            task,
        }
    }

    /// Puts backend `i` in or out of rotation for new connections.
    pub fn set(&self, i: usize, in_rotation: bool) {
        self.backends.lock().expect("backends")[i].1 = in_rotation;
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
