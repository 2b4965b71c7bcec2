//! A stand-in kubelet for the network-namespace test: an HTTPS server that
//! answers every request with a fixed body. Usage:
//! `test-kubelet <listen addr> <cert.pem> <key.pem>`.

use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, cert, key] = args.as_slice() else {
        anyhow::bail!("usage: test-kubelet <addr> <cert> <key>");
    };
    let l = TcpListener::bind(addr).await?;
    eprintln!("test-kubelet listening on {}", l.local_addr()?);
    tests::dest::https_on(
        l,
        cert.as_ref(),
        key.as_ref(),
        "kubelet in the node namespace",
    )?;
    std::future::pending::<()>().await;
    Ok(())
}
