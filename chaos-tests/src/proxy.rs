//! A TCP proxy in front of one node, able to cut off chosen peers: the partition nemesis.
//!
//! Every node is reached through its proxy (the proxy's address is what the node advertises),
//! and every node opens its peer connections from its own loopback address
//! (`--peer-source-ip 127.0.0.<10+id>`), so the proxy knows which peer a connection comes
//! from. Blocking a source cuts its open connections and black-holes new ones (they are
//! accepted and then ignored until the block is lifted, like packets dropped by a firewall:
//! the peer's requests time out rather than fail fast). Clients connect from 127.0.0.1 and
//! are never blocked.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

struct State {
    target: SocketAddr,
    blocked: Mutex<HashSet<IpAddr>>,
    conns: Mutex<HashMap<u64, (IpAddr, AbortHandle)>>,
    next: AtomicU64,
}

/// One proxy (see the module docs).
pub struct Proxy {
    /// Where clients and peers connect.
    pub listen: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for (_, (_, h)) in self.state.conns.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            h.abort();
        }
    }
}

impl Proxy {
    /// A proxy on a free 127.0.0.1 port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let state = Arc::new(State {
            target,
            blocked: Mutex::new(HashSet::new()),
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else { continue };
                let _ = conn.set_nodelay(true);
                let st2 = st.clone();
                let id = st.next.fetch_add(1, Ordering::Relaxed);
                let ip = peer.ip();
                let task = tokio::spawn(async move {
                    serve(conn, ip, st2.clone()).await;
                    st2.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                });
                st.conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, (ip, task.abort_handle()));
            }
        });
        Ok(Proxy { listen, state, accept })
    }

    /// Cut `ip` off: close its open connections, black-hole new ones.
    pub fn block(&self, ip: IpAddr) {
        self.state.blocked.lock().unwrap_or_else(|e| e.into_inner()).insert(ip);
        let mut conns = self.state.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, (src, h)| {
            if *src == ip {
                h.abort();
                false
            } else {
                true
            }
        });
    }

    /// Let everyone through again.
    pub fn unblock_all(&self) {
        self.state.blocked.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn is_blocked(state: &State, ip: IpAddr) -> bool {
        state.blocked.lock().unwrap_or_else(|e| e.into_inner()).contains(&ip)
    }
}

async fn serve(mut conn: TcpStream, ip: IpAddr, st: Arc<State>) {
    if Proxy::is_blocked(&st, ip) {
        // Black hole: hold the connection, forward nothing, until the block is lifted.
        while Proxy::is_blocked(&st, ip) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return;
    }
    let Ok(Ok(mut upstream)) =
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(st.target)).await
    else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(proxy: SocketAddr, src: IpAddr) -> bool {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src, 0)).unwrap();
        let Ok(mut c) = sock.connect(proxy).await else { return false };
        if c.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        matches!(
            tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut buf)).await,
            Ok(Ok(_))
        )
    }

    #[tokio::test]
    async fn blocks_only_the_chosen_source() {
        let target = echo_server().await;
        let p = Proxy::start(target).await.unwrap();
        let a: IpAddr = "127.0.0.11".parse().unwrap();
        let b: IpAddr = "127.0.0.12".parse().unwrap();
        assert!(roundtrip(p.listen, a).await);
        p.block(a);
        assert!(!roundtrip(p.listen, a).await, "blocked source gets nothing through");
        assert!(roundtrip(p.listen, b).await, "other sources pass");
        p.unblock_all();
        assert!(roundtrip(p.listen, a).await);
    }
}
