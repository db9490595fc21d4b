//! Slow start: a backend that becomes healthy ramps from a small share of its weight to all
//! of it over `slow_start`, with round_robin, least_conn and random alike. Measured by
//! counting where requests go in windows after the backend came back.

mod support;

use std::time::Instant;

use support::*;

/// Share of requests `b` took in each 500 ms window after it turned healthy (9 windows
/// with a 4 s ramp), for `algorithm`.
async fn shares_after_recovery(algorithm: &str) -> Vec<f64> {
    let [a, b] = start_backends(["a", "b"]).await;
    b.set_healthy(false);
    let lb = Ballast::start(
        &TestConfig::new(&[&a, &b])
            .pool(&format!(
                "algorithm = \"{algorithm}\"\nslow_start = \"4s\"\n[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"50ms\"\nrise = 1\nfall = 1\n"
            ))
            .build(),
    );
    let web = lb.addr("web");
    b.set_healthy(true);
    assert!(lb.wait_for_log("backend is healthy", WAIT), "{}", lb.logs());
    let t0 = Instant::now();
    let mut client = Client::connect(web).await.unwrap();
    let windows = 9;
    let mut counts = vec![(0usize, 0usize); windows];
    // Bounded: the time limit ends it (and at most 200k requests).
    for _ in 0..200_000 {
        let w = (t0.elapsed().as_millis() / 500) as usize;
        if w >= windows {
            break;
        }
        let r = client.get("/").await.expect("request");
        assert_eq!(r.status, 200);
        counts[w].0 += 1;
        if r.backend() == "b" {
            counts[w].1 += 1;
        }
    }
    counts
        .iter()
        .map(|(n, to_b)| *to_b as f64 / (*n).max(1) as f64)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_backend_ramps_up_over_slow_start() {
    let (rr, lc, random) = tokio::join!(
        shares_after_recovery("round_robin"),
        shares_after_recovery("least_conn"),
        shares_after_recovery("random"),
    );
    for (algorithm, shares) in [("round_robin", rr), ("least_conn", lc), ("random", random)] {
        let shown: Vec<String> = shares
            .iter()
            .map(|s| format!("{:.0}%", s * 100.0))
            .collect();
        println!("{algorithm}: share of the recovered backend per 500 ms window: {shown:?}");
        // At full weight b takes half. During the ramp its effective weight is 5-13% of
        // its weight in the first window and 25-38% in the third, so it takes at most
        // w/(1+w) of the requests: 11% and 27% (less with least_conn, which picks it only
        // when admitted and least loaded). The ramp is over after the eighth window.
        assert!(shares[0] < 0.2, "{algorithm}: first window {shown:?}");
        assert!(
            shares[2] < 0.4,
            "{algorithm}: still ramping at 1.5 s {shown:?}"
        );
        assert!(
            shares[5] > shares[0] + 0.1,
            "{algorithm}: ramping up {shown:?}"
        );
        assert!(
            shares[8] > 0.38,
            "{algorithm}: full weight after the ramp {shown:?}"
        );
    }
}
