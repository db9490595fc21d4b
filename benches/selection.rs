//! Backend selection per algorithm, for pools of 3 and 1000 backends: the per-request cost
//! (`Pool::select`, which includes the availability checks and the in-flight lease), the
//! cost of slow start, and the per-reload cost (`Pool::build`).

use std::hint::black_box;
use std::path::Path;

use ballast::balance::policy::hash_key;
use ballast::balance::Pool;
use ballast::config::Config;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn pool_config(algorithm: &str, n: usize) -> Config {
    let backends: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{ address = \"10.{}.{}.{}:8080\", weight = {} }}",
                i / 65536,
                (i / 256) % 256,
                i % 256,
                1 + i % 3
            )
        })
        .collect();
    let key = if algorithm == "hash" {
        "hash_key = \"client_ip\"\n"
    } else {
        ""
    };
    let text = format!(
        "[listeners.l]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nalgorithm = \"{algorithm}\"\n{key}backends = [{}]\n",
        backends.join(",")
    );
    Config::from_toml_str(&text, Path::new("bench.toml")).expect("valid bench config")
}

fn select(c: &mut Criterion) {
    let mut group = c.benchmark_group("select");
    for algorithm in ["round_robin", "least_conn", "random", "hash"] {
        for n in [3usize, 1000] {
            let config = pool_config(algorithm, n);
            let pool = Pool::build(&config.pools[0], None, true, false);
            let mut k = 0u64;
            group.bench_with_input(BenchmarkId::new(algorithm, n), &pool, |b, pool| {
                b.iter(|| {
                    k = k.wrapping_add(1);
                    let key = Some(hash_key(&k.to_le_bytes()));
                    black_box(pool.select(key, &[]))
                })
            });
        }
    }
    group.finish();
}

/// Slow start's cost per pick: a pool with `slow_start` set and no backend ramping (the
/// steady state), and with one of three backends ramping (a random draw per visit).
fn select_slow_start(c: &mut Criterion) {
    let mut group = c.benchmark_group("select_slow_start");
    for algorithm in ["round_robin", "least_conn"] {
        let mut config = pool_config(algorithm, 3);
        config.pools[0].slow_start = Some(std::time::Duration::from_secs(3600));
        let pool = Pool::build(&config.pools[0], None, true, false);
        group.bench_function(BenchmarkId::new(algorithm, "none_ramping"), |b| {
            b.iter(|| black_box(pool.select(None, &[])))
        });
        pool.backends[0].start_ramp();
        group.bench_function(BenchmarkId::new(algorithm, "one_ramping"), |b| {
            b.iter(|| black_box(pool.select(None, &[])))
        });
    }
    group.finish();
}

/// What the traffic-management keys cost per pick when they are set, next to the same pool
/// without them (`plain`, which must cost what `select` did before they existed): backups
/// (a tiered pick), a panic threshold (a count of available primaries), max_connections
/// (a bounded lease) and hash_balance_factor (a pass summing in-flight counts).
fn select_traffic(c: &mut Criterion) {
    let mut group = c.benchmark_group("select_traffic");
    type Set = fn(&mut ballast::config::PoolConfig);
    let variants: [(&str, &str, Set); 5] = [
        ("round_robin", "plain", |_| {}),
        ("round_robin", "backup", |p| p.backends[2].backup = true),
        ("round_robin", "panic_threshold", |p| {
            p.panic_threshold = Some(0.5)
        }),
        ("round_robin", "max_connections", |p| {
            p.backends
                .iter_mut()
                .for_each(|b| b.max_connections = Some(1000))
        }),
        ("hash", "hash_balance_factor", |p| {
            p.hash_balance_factor = Some(125)
        }),
    ];
    for (algorithm, label, set) in variants {
        for n in [3usize, 1000] {
            let mut config = pool_config(algorithm, n);
            set(&mut config.pools[0]);
            let pool = Pool::build(&config.pools[0], None, true, false);
            let mut k = 0u64;
            group.bench_function(BenchmarkId::new(label, n), |b| {
                b.iter(|| {
                    k = k.wrapping_add(1);
                    let key = Some(hash_key(&k.to_le_bytes()));
                    black_box(pool.select(key, &[]))
                })
            });
        }
    }
    group.finish();
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    for algorithm in ["round_robin", "hash"] {
        let config = pool_config(algorithm, 1000);
        group.bench_function(BenchmarkId::new(algorithm, 1000), |b| {
            b.iter(|| black_box(Pool::build(&config.pools[0], None, true, false)))
        });
    }
    group.finish();
}

criterion_group!(benches, select, select_slow_start, select_traffic, build);
criterion_main!(benches);
