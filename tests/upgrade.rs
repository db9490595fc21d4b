//! Zero-downtime restart: a new process takes the listening sockets over from the running
//! one while clients keep sending requests.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{start_backends, Backend, Ballast, Client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_with_socket_handover_fails_no_request() {
    let [a, b] = start_backends(["a", "b"]).await;
    let sockdir = tempfile::tempdir().unwrap();
    let handover = sockdir.path().join("handover.sock");
    let text = format!(
        "[global]\nhandover_socket = \"{}\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n[pools.app]\nbackends = [\"{}\", \"{}\"]\n",
        handover.display(),
        a.addr,
        b.addr
    );
    let mut old = Ballast::start(&text);
    let addr = old.addr("web");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, ok) = (stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut client = Client::connect(addr).await.unwrap();
            for n in 0..50_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                // Half the clients open a new connection per request (those land in the
                // shared accept queue), half reuse keep-alive connections.
                if i % 2 == 0 {
                    client = Client::connect(addr).await.unwrap();
                }
                let path = if n % 5 == 0 { "/slow/30" } else { "/" };
                let mut result = client.get(path).await;
                if let Err(e) = &result {
                    // A server may close an idle keep-alive connection as the client reuses
                    // it; HTTP clients resend such a request on a new connection (RFC 9112
                    // §9.3.1). A request on a fresh connection gets no such second chance.
                    if i % 2 == 1 && (e.is_incomplete_message() || e.is_canceled() || e.is_closed())
                    {
                        client = Client::connect(addr).await.unwrap();
                        result = client.get(path).await;
                    }
                }
                match result {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status)),
                    Err(e) => failures.push(format!("error {e}")),
                }
            }
            failures
        }));
    }
    support::eventually(Duration::from_secs(10), async || {
        ok.load(Ordering::SeqCst) > 200
    })
    .await
    .expect("traffic flows through the old process");

    let new = old.upgrade();
    assert_eq!(
        new.addr("web"),
        addr,
        "the successor serves the same socket"
    );
    assert!(
        new.logs().contains("listener=web addr=") && new.logs().contains("inherited=true"),
        "{}",
        new.logs()
    );
    assert!(
        new.wait_for_log("upgrade complete", Duration::from_secs(10)),
        "{}",
        new.logs()
    );
    assert_eq!(
        old.wait_exit(Duration::from_secs(15)),
        Some(0),
        "old process drains and exits 0:\n{}",
        old.logs()
    );
    let at_exit = ok.load(Ordering::SeqCst);
    support::eventually(Duration::from_secs(10), async || {
        ok.load(Ordering::SeqCst) > at_exit + 300
    })
    .await
    .expect("traffic flows through the new process after the old one exited");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let failures = c.await.unwrap();
        assert!(
            failures.is_empty(),
            "failed requests across the upgrade: {failures:?}\nold:\n{}\nnew:\n{}",
            old.logs(),
            new.logs()
        );
    }
    // The successor's admin endpoint answers on the inherited admin socket.
    let (code, status) = support::admin_call(new.admin(), "GET", "/status", None).await;
    assert_eq!(code, 200);
    assert_eq!(status["ready"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activation_is_honoured() {
    use std::os::fd::AsRawFd;
    let a = Backend::start("a").await;
    // The socket systemd would pass: bound here, inherited by the daemon (no CLOEXEC).
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::empty()).unwrap();
    let fd = socket.as_raw_fd().to_string();
    let text = format!(
        "[listeners.web]\nbind = \"{addr}\"\npool = \"app\"\n\n[pools.app]\nbackends = [\"{}\"]\n",
        a.addr
    );
    // Without adopting the socket the daemon could not bind: the address is in use.
    let lb = Ballast::start_with(&text, &[("LISTEN_FDS", "1"), ("LISTEN_FDS_FIRST_FD", &fd)]);
    assert!(lb.logs().contains("inherited=true"), "{}", lb.logs());
    let r = support::get(addr, "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "a"));
}
