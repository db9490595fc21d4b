//! Route matching per request (`Router::route`): a listener with no routes (what every
//! request paid before matchers existed), ten host and prefix routes, and the same with
//! `methods` and a `path_regex` in front of them, against a path that reaches the last
//! route or none.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use ballast::config::Config;
use ballast::discovery::Resolved;
use ballast::routing::{Fields, RequestView};
use ballast::state::Snapshot;
use criterion::{criterion_group, criterion_main, Criterion};

fn router(routes: &str) -> Snapshot {
    let text = format!(
        "[listeners.l]\nbind = \"127.0.0.1:0\"\npool = \"p\"\nroutes = [{routes}]\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n"
    );
    let config = Config::from_toml_str(&text, Path::new("bench.toml")).expect("valid bench config");
    Snapshot::build(Arc::new(config), None, &Resolved::new(), true, None)
}

fn prefixes(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!("{{ host = \"h{i}.example.com\", path_prefix = \"/p{i}/\", pool = \"p\" }}")
        })
        .collect()
}

fn route(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    let plain = prefixes(10);
    let mut with_matchers = vec![
        "{ path = \"/robots.txt\", methods = [\"GET\", \"HEAD\"], pool = \"p\" }".to_string(),
        "{ path_regex = \"^/users/[0-9]+/avatar$\", methods = [\"GET\"], pool = \"p\" }"
            .to_string(),
    ];
    with_matchers.extend(prefixes(10));
    let cases = [
        ("no_routes", String::new()),
        ("10_prefix_routes", plain.join(", ")),
        (
            "path_methods_regex_then_10_prefix_routes",
            with_matchers.join(", "),
        ),
    ];
    let headers = http::HeaderMap::new();
    let view = |host, path| RequestView {
        host: Some(host),
        path,
        method: &http::Method::GET,
        headers: Fields::Map(&headers),
        query: None,
        client: std::net::IpAddr::from([10, 0, 0, 1]),
        sni: None,
    };
    for (name, routes) in cases {
        let snap = router(&routes);
        let r = &snap.routers["l"];
        group.bench_function(format!("{name}/last_route"), |b| {
            b.iter(|| black_box(r.route(&view("h9.example.com", black_box("/p9/items/1")))))
        });
        group.bench_function(format!("{name}/no_match"), |b| {
            b.iter(|| {
                black_box(r.route(&view("other.example.com", black_box("/users/42/avatar/x"))))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
