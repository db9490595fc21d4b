//! Distribution of real traffic across real backends, per algorithm.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::{get, get_with, start_backends, Backend, Ballast, Client, TestConfig};

fn pool_config(algorithm: &str, backends: &[(&Backend, u32)], extra: &str) -> String {
    TestConfig::weighted(backends)
        .pool(&format!("algorithm = \"{algorithm}\"\n{extra}"))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_distributes_exactly() {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    let lb = Ballast::start(&pool_config(
        "round_robin",
        &[(&a, 1), (&b, 1), (&c, 1)],
        "",
    ));
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    let mut seq = Vec::new();
    for _ in 0..30 {
        let r = client.get("/").await.unwrap();
        assert_eq!(r.status, 200);
        seq.push(r.body);
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (10, 10, 10));
    // A strict rotation: every window of three holds each backend once.
    for w in seq.chunks(3) {
        let mut w = w.to_vec();
        w.sort();
        assert_eq!(w, ["a", "b", "c"], "sequence {seq:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_interleaves() {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    let lb = Ballast::start(&pool_config(
        "round_robin",
        &[(&a, 3), (&b, 1), (&c, 1)],
        "",
    ));
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    let mut seq = String::new();
    for _ in 0..25 {
        seq.push_str(&client.get("/").await.unwrap().body);
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (15, 5, 5));
    // Each cycle of five is the smooth order a b a c a, never a a a in a row.
    for cycle in seq.as_bytes().chunks(5) {
        assert_eq!(cycle, b"abaca", "sequence {seq}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_steers_away_from_a_slow_backend() {
    let [slow, fast] = start_backends(["slow", "fast"]).await;
    slow.set_delay(100);
    let lb = Ballast::start(&pool_config("least_conn", &[(&slow, 1), (&fast, 1)], ""));
    let addr = lb.addr("web");
    // Four clients, 25 requests each: round robin would give the slow backend half.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            for _ in 0..25 {
                assert_eq!(c.get("/").await.unwrap().status, 200);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(slow.hits() + fast.hits(), 100);
    assert!(
        fast.hits() >= 4 * slow.hits(),
        "least_conn should favour the fast backend: slow={} fast={}",
        slow.hits(),
        fast.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_avoids_the_backend_with_requests_in_flight() {
    let [a, b] = start_backends(["a", "b"]).await;
    let lb = Ballast::start(&pool_config("least_conn", &[(&a, 1), (&b, 1)], ""));
    let addr = lb.addr("web");
    // Six slow requests: least_conn spreads them over both backends.
    let mut slow = Vec::new();
    for _ in 0..6 {
        slow.push(tokio::spawn(async move { get(addr, "/slow/2000").await }));
    }
    support::eventually(Duration::from_secs(5), async || {
        a.in_flight() + b.in_flight() == 6
    })
    .await
    .expect("slow requests in flight");
    // Concurrent arrivals can race to a 4/2 split; never worse.
    let (la, lb_) = (a.in_flight(), b.in_flight());
    assert!(
        la.abs_diff(lb_) <= 2,
        "least_conn balances in-flight work: {la}/{lb_}"
    );
    let before = (a.hits(), b.hits());
    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    let spread = (a.hits() - before.0, b.hits() - before.1);
    assert_eq!(spread.0 + spread.1, 10);
    if la == lb_ {
        assert!(
            spread.0 >= 4 && spread.1 >= 4,
            "ties must be broken fairly: {spread:?}"
        );
    } else {
        let to_idle = if la < lb_ { spread.0 } else { spread.1 };
        assert_eq!(
            to_idle, 10,
            "fast requests go to the less loaded backend: {spread:?}"
        );
    }
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_is_sticky_and_moves_about_one_nth_of_keys_when_a_backend_leaves() {
    let mut backends = Vec::new();
    for n in ["a", "b", "c", "d", "e"] {
        backends.push(Backend::start(n).await);
    }
    let list: Vec<(&Backend, u32)> = backends.iter().map(|b| (b, 1)).collect();
    let extra = "hash_key = \"header:X-User\"\n[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\nrise = 1\n";
    let lb = Ballast::start(&pool_config("hash", &list, extra));
    let addr = lb.addr("web");
    let mut client = Client::connect(addr).await.unwrap();
    let mut first = HashMap::new();
    for user in 0..200 {
        let req = |u: i32| {
            http::Request::get("/")
                .header("host", "t")
                .header("x-user", format!("user-{u}"))
                .body(Default::default())
                .unwrap()
        };
        let r1 = client.request(req(user)).await.unwrap();
        let r2 = client.request(req(user)).await.unwrap();
        assert_eq!(r1.body, r2.body, "the same key reaches the same backend");
        first.insert(user, r1.body);
    }
    let used: std::collections::HashSet<_> = first.values().collect();
    assert_eq!(used.len(), 5, "keys spread over all backends");

    backends[2].set_healthy(false);
    let gone = &backends[2].name;
    support::eventually(Duration::from_secs(5), async || {
        lb.logs().contains(&format!(
            "backend={} reason=unexpected status 503",
            backends[2].addr
        ))
    })
    .await
    .expect("backend c marked unhealthy");
    let mut moved = 0;
    for user in 0..200 {
        let r = client
            .request(
                http::Request::get("/")
                    .header("host", "t")
                    .header("x-user", format!("user-{user}"))
                    .body(Default::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        if r.body != first[&user] {
            moved += 1;
            assert_eq!(&first[&user], gone, "only keys of the removed backend move");
        }
    }
    let on_gone = first.values().filter(|b| *b == gone).count();
    assert_eq!(moved, on_gone);
    assert!(
        (20..=70).contains(&moved),
        "about 1/5 of 200 keys should move, {moved} did"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_client_ip_and_cookie_is_sticky() {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    let lb = Ballast::start(&pool_config(
        "hash",
        &[(&a, 1), (&b, 1), (&c, 1)],
        "hash_key = \"cookie:session\"",
    ));
    let addr = lb.addr("web");
    for s in 0..20 {
        let cookie = format!("theme=dark; session=s{s}");
        let first = get_with(addr, "/", &[("cookie", &cookie)]).await.body;
        for _ in 0..3 {
            assert_eq!(
                get_with(addr, "/", &[("cookie", &cookie)]).await.body,
                first
            );
        }
    }
    drop(lb);
    let lb = Ballast::start(&pool_config(
        "hash",
        &[(&a, 1), (&b, 1), (&c, 1)],
        "hash_key = \"client_ip\"",
    ));
    let addr = lb.addr("web");
    let first = get(addr, "/").await.body;
    for _ in 0..10 {
        assert_eq!(
            get(addr, "/").await.body,
            first,
            "one client IP, one backend"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_uses_every_backend() {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    let lb = Ballast::start(&pool_config("random", &[(&a, 1), (&b, 1), (&c, 1)], ""));
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    for _ in 0..150 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    for h in [a.hits(), b.hits(), c.hits()] {
        assert!(
            (20..=90).contains(&h),
            "random spread {:?}",
            (a.hits(), b.hits(), c.hits())
        );
    }
}
