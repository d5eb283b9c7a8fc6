//! The harness against the real service (embedded store, 127.0.0.1 port 0) and the echo server,
//! briefly, so it never rots: a few thousand opt-outs, a second per workload.

use std::time::Duration;

use optout::server::{ServerConfig, open_embedded, serve};
use optout_loadtest::{Mode, Target, Workload, population::Population, run, seed};

async fn start_service(dir: &std::path::Path) -> (String, tokio::sync::oneshot::Sender<()>) {
    let mut config = ServerConfig::new(dir.to_path_buf());
    config.rate_limit.per_second = 0;
    config.filter.capacity = 10_000;
    let store = std::sync::Arc::new(open_embedded(&config).await.expect("store"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, store, config, async {
        let _ = stopped.await;
    }));
    (url, stop)
}

fn workload(mode: Mode) -> Workload {
    Workload {
        mode,
        batch: 200,
        concurrency: 4,
        connections: 2,
        duration: Duration::from_millis(800),
        count: 0,
        rate: 0.0,
        opted_share: 0.05,
        warmup: Duration::from_millis(200),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_and_runs_every_mode_with_no_leak() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, stop) = start_service(dir.path()).await;
    let pop = Population::new(7, 3000);
    let bar = indicatif::ProgressBar::hidden();
    let mut seeded = None;
    for _ in 0..100 {
        if let Ok(s) = seed(&url, None, &pop, None, false, false, &bar).await {
            seeded = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seeded.expect("seeded").received, 3000);

    // A second seed would REPLACE the list the store now holds: refused, nothing changed, unless
    // forced, and then what it removed is said.
    let other = Population::new(8, 1000);
    let refused = seed(&url, None, &other, None, false, false, &bar)
        .await
        .expect_err("a store holding opt-outs is not replaced without --force");
    let text = refused.to_string();
    assert!(
        matches!(refused, optout_loadtest::Error::Usage(_))
            && text.contains("holds 3000 national data opt-outs")
            && text.contains("--force")
            && text.contains("Nothing was changed"),
        "{text}"
    );
    let forced = seed(&url, None, &other, None, false, true, &bar)
        .await
        .expect("forced");
    assert_eq!((forced.added, forced.removed), (1000, 3000));
    let again = seed(&url, None, &pop, None, false, true, &bar)
        .await
        .expect("the first population back");
    assert_eq!((again.added, again.removed), (3000, 1000));
    let target = Target::Grpc {
        url: url.clone(),
        api_key: None,
    };
    for mode in [Mode::Batch, Mode::Single, Mode::Stream] {
        let r = run(&target, &pop, &workload(mode)).await.expect("run");
        assert!(r.requests > 0, "{mode:?}: {r:?}");
        assert!(
            r.planted_seen > 0 || mode == Mode::Single,
            "{mode:?}: {r:?}"
        );
        assert_eq!(r.leaks, 0, "{mode:?}");
        assert!(r.errors.is_empty(), "{mode:?}: {:?}", r.errors);
        assert!(r.latency_us.p50 > 0 && r.latency_us.p50 <= r.latency_us.max);
    }
    // The HTML report of a run: well-formed, one throughput line and one table row per report,
    // a bar per latency bucket and report, and the figures of the JSON report.
    let mut long = workload(Mode::Batch);
    long.duration = Duration::from_millis(2_300);
    let mut service = run(&target, &pop, &long).await.expect("run");
    service.target = "service".into();
    assert_eq!(service.numbers_each_second.len(), 2, "whole seconds only");
    assert!(service.numbers_each_second.iter().sum::<u64>() <= service.numbers);
    let echoed = optout_loadtest::Report {
        target: "echo".into(),
        ..service.clone()
    };
    let page = optout_loadtest::report::html("a <test>", &[service.clone(), echoed]);
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    let doc =
        roxmltree::Document::parse_with_options(&page, options).expect("the page is well-formed");
    let by_id = |id: &str| {
        doc.descendants()
            .find(|n| n.attribute("id") == Some(id))
            .unwrap_or_else(|| panic!("no #{id}"))
    };
    // A run's line or bar is drawn in its colour; axes and ticks are black, a legend's square is
    // 10 wide.
    let palette: Vec<String> = optout_loadtest::report::COLOURS
        .iter()
        .map(|c| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2))
        .collect();
    let in_palette = |n: &roxmltree::Node, attr: &str| {
        n.attribute(attr)
            .is_some_and(|f| palette.iter().any(|c| c == f))
    };
    // Plotters draws a run's line as one polyline ("x,y x,y ").
    let lines: Vec<_> = by_id("throughput")
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && in_palette(n, "stroke"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]
            .attribute("points")
            .map(|p| p.split_whitespace().count()),
        Some(2)
    );
    let rows = by_id("percentiles")
        .children()
        .filter(|n| n.has_tag_name("tr"))
        .count();
    assert_eq!(rows, 3, "a header and a row per report");
    let bars = by_id("latency")
        .descendants()
        .filter(|n| {
            n.has_tag_name("rect") && n.attribute("width") != Some("10") && in_palette(n, "fill")
        })
        .count();
    assert_eq!(bars, 2 * service.latency_histogram_us.len());
    assert!(page.contains(&format!("<td>{}</td>", service.latency_us.p99)));
    assert!(page.contains("a &lt;test&gt;"), "text is escaped");
    // Latency over time: a p50 and a p99 line a report, a point a second.
    assert_eq!(
        service.latency_each_second_us.len(),
        2,
        "whole seconds only"
    );
    let lines: Vec<_> = by_id("latency-over-time")
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && in_palette(n, "stroke"))
        .collect();
    assert_eq!(lines.len(), 4);
    assert!(
        service
            .latency_each_second_us
            .iter()
            .all(|(p50, p99)| 0 < *p50 && p50 <= p99),
        "{:?}",
        service.latency_each_second_us
    );
    // The runs' metadata and the requests by status code: a row per report.
    for table in ["runs", "codes"] {
        let rows = by_id(table)
            .children()
            .filter(|n| n.has_tag_name("tr"))
            .count();
        assert_eq!(rows, 3, "{table}: a header and a row per report");
    }
    // Open loop at a modest rate sends about rate x duration requests.
    let mut open = workload(Mode::Batch);
    open.rate = 100.0;
    let r = run(&target, &pop, &open).await.expect("open loop");
    assert!((40..=120).contains(&r.requests), "{}", r.requests);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_server_releases_everything_so_the_harness_counts_leaks() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(optout_loadtest::echo::serve(listener, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pop = Population::new(7, 3000);
    let r = run(
        &Target::Grpc { url, api_key: None },
        &pop,
        &workload(Mode::Batch),
    )
    .await
    .expect("run");
    // The echo server releases planted numbers too: the leak counter must see every one, and
    // those released during the warm-up (not measured) are still counted, apart.
    assert!(r.planted_seen > 0);
    assert_eq!(r.leaks, r.planted_seen);
    assert!(
        r.warmup_leaks > 0,
        "leaks during the warm-up are counted: {}",
        optout_loadtest::summary(&r)
    );
    assert!(optout_loadtest::summary(&r).contains(" warm-up leaks "));
    let _ = stop.send(());
}

/// `seed --national-check`: a store in population mode is seeded with a national check round trip
/// of the planted numbers and the clean pool, and the pool's numbers are then released (they were
/// checked), the planted withheld, and a number outside the pool withheld as never checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_national_check_seeds_a_store_in_population_mode() {
    use optout_proto::{CheckRequest, Purpose, Reason, opt_out_check_client::OptOutCheckClient};
    let dir = tempfile::tempdir().expect("tempdir");
    let embedded = optout::store::embedded::EmbeddedConfig {
        data_dir: dir.path().to_path_buf(),
        change_log_len: 100,
        cache_bytes: optout::store::embedded::DEFAULT_CACHE_BYTES,
    };
    drop(
        optout::store::embedded::EmbeddedStore::init(
            &embedded,
            optout::core::coverage::CoverageMode::Population,
        )
        .expect("init"),
    );
    let (url, stop) = start_service(dir.path()).await;
    let pop = Population::new(7, 2000).with_pool(3000);
    let bar = indicatif::ProgressBar::hidden();
    let mut seeded = None;
    for _ in 0..100 {
        if let Ok(s) = seed(&url, None, &pop, None, true, false, &bar).await {
            seeded = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seeded.expect("seeded").received,
        2000,
        "the planted are the opt-outs"
    );
    let checked: Vec<_> = pop.checked().collect();
    let planted = checked
        .iter()
        .find(|n| pop.is_planted(**n))
        .expect("planted");
    let clean = checked
        .iter()
        .find(|n| !pop.is_planted(**n))
        .expect("clean");
    let outside = Population::new(7, 2000)
        .with_pool(90_000_000)
        .checked()
        .skip(checked.len() + 10)
        .find(|n| !pop.is_planted(*n))
        .expect("outside");
    let mut client = OptOutCheckClient::connect(url.clone())
        .await
        .expect("connect");
    let mut reasons = Vec::new();
    for _ in 0..100 {
        let r = client
            .check(CheckRequest {
                nhs_numbers: [planted, clean, &outside]
                    .map(|n| n.to_string())
                    .into_iter()
                    .collect(),
                purpose: Purpose::Research as i32,
                // Data held outside GP practices, as the load test checks: type 1, never
                // imported whole here, does not apply.
                origin: optout_proto::DataOrigin::Other as i32,
                ..CheckRequest::default()
            })
            .await
            .expect("check")
            .into_inner();
        reasons = r.decisions.iter().map(|d| d.reason).collect();
        if reasons[1] == Reason::NoOptOut as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        reasons,
        vec![
            Reason::NationalDataOptOut as i32,
            Reason::NoOptOut as i32,
            Reason::NotInCheckedPopulation as i32
        ]
    );
    let target = Target::Grpc { url, api_key: None };
    let r = run(&target, &pop, &workload(Mode::Batch))
        .await
        .expect("run");
    assert!(r.requests > 0 && r.planted_seen > 0, "{r:?}");
    assert_eq!(r.leaks, 0);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let _ = stop.send(());
}

/// `optout-loadtest run`, the binary: a store never seeded is named before anything is measured
/// (exit 2), and failed requests are broken down by status code and fail the run (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_says_seed_first_and_fails_on_errors_by_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, stop) = start_service(dir.path()).await;
    let run_bin = {
        let url = url.clone();
        move |extra: &[&str]| {
            let mut args = vec![
                "run",
                "--server",
                url.as_str(),
                "--count",
                "2000",
                "--duration",
                "300ms",
                "--warmup",
                "0s",
                "--concurrency",
                "2",
                "--connections",
                "1",
            ];
            args.extend_from_slice(extra);
            std::process::Command::new(env!("CARGO_BIN_EXE_optout-loadtest"))
                .args(&args)
                .output()
                .expect("runs")
        }
    };
    let unseeded = tokio::task::spawn_blocking({
        let run_bin = run_bin.clone();
        move || run_bin(&[])
    })
    .await
    .expect("join");
    let err = String::from_utf8_lossy(&unseeded.stderr);
    assert_eq!(unseeded.status.code(), Some(2), "{err}");
    assert!(
        err.contains("holds no national data opt-outs") && err.contains("seed it first"),
        "{err}"
    );

    let bar = indicatif::ProgressBar::hidden();
    let mut seeded = false;
    for _ in 0..100 {
        if seed(
            &url,
            None,
            &Population::new(42, 2000),
            None,
            false,
            false,
            &bar,
        )
        .await
        .is_ok()
        {
            seeded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seeded);
    // Thresholds, as k6 writes them: met, the run passes; one broken, it fails, saying which.
    let run_met = run_bin.clone();
    let met = tokio::task::spawn_blocking(move || {
        run_met(&["--threshold", "p99<60s", "--threshold", "rate>=1"])
    })
    .await
    .expect("join");
    let out = String::from_utf8_lossy(&met.stdout);
    assert_eq!(met.status.code(), Some(0), "{out}");
    assert!(
        out.contains("threshold p99<60s: ") && out.contains(" ok"),
        "{out}"
    );
    let run_broken = run_bin.clone();
    let broken = tokio::task::spawn_blocking(move || run_broken(&["--threshold", "p50<1us"]))
        .await
        .expect("join");
    let out = String::from_utf8_lossy(&broken.stdout);
    assert_eq!(broken.status.code(), Some(1), "{out}");
    assert!(
        out.contains("threshold p50<1us: ") && out.contains("FAILED"),
        "{out}"
    );
    // Batches over the server's --max-batch (10,000): every request refused.
    let refused = tokio::task::spawn_blocking(move || run_bin(&["--batch", "20000"]))
        .await
        .expect("join");
    let (out, err) = (
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr),
    );
    assert_eq!(refused.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("(InvalidArgument "), "{out}");
    assert!(
        err.contains("service requests failed (InvalidArgument ") && err.contains("--allow-errors"),
        "{err}"
    );
    let _ = stop.send(());
}

/// Certificates made at test time: a CA, the server's (localhost, 127.0.0.1), a client's.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "loadtest CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().expect("key");
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    sp.subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let server = sp.signed_by(&server_key, &issuer).expect("server cert");
    let client_key = KeyPair::generate().expect("key");
    let mut cp = CertificateParams::new(Vec::<String>::new()).expect("params");
    cp.distinguished_name.push(DnType::OrganizationName, "RX1");
    let client = cp.signed_by(&client_key, &issuer).expect("client cert");
    Pki {
        ca: ca.pem(),
        server: (server.pem(), server_key.serialize_pem()),
        client: (client.pem(), client_key.serialize_pem()),
    }
}

/// `seed` and `run` against a service that requires mutual TLS: with --ca-cert, --client-cert and
/// --client-key they connect; without the client certificate the service refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_and_run_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki();
    let mut config = ServerConfig::new(dir.path().join("data"));
    config.rate_limit.per_second = 0;
    config.filter.capacity = 10_000;
    config.tls = Some(optout::server::TlsFiles {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: Some(pki.ca.clone().into_bytes()),
    });
    let store = std::sync::Arc::new(open_embedded(&config).await.expect("store"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().expect("addr").port()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, store, config, async {
        let _ = stopped.await;
    }));
    let files = dir.path();
    for (name, body) in [
        ("ca.pem", &pki.ca),
        ("client.pem", &pki.client.0),
        ("client-key.pem", &pki.client.1),
    ] {
        std::fs::write(files.join(name), body).expect("write");
    }
    let path = |n: &str| files.join(n).to_str().expect("utf-8").to_string();
    let tls = vec![
        "--ca-cert".to_string(),
        path("ca.pem"),
        "--client-cert".to_string(),
        path("client.pem"),
        "--client-key".to_string(),
        path("client-key.pem"),
    ];
    let bin = env!("CARGO_BIN_EXE_optout-loadtest");
    let run = move |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin)
                .args(&args)
                .output()
                .expect("runs")
        })
    };
    let mut seeded = None;
    for _ in 0..50 {
        let mut a = vec![
            "seed".to_string(),
            "--server".into(),
            url.clone(),
            "--count".into(),
            "500".into(),
        ];
        a.extend(tls.clone());
        let out = run(a).await.expect("join");
        if out.status.success() {
            seeded = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seeded = seeded.expect("seeded over mutual TLS");
    assert!(String::from_utf8_lossy(&seeded.stdout).contains("seeded 500 opt-outs"));
    let mut a: Vec<String> = [
        "run",
        "--server",
        &url,
        "--count",
        "500",
        "--duration",
        "300ms",
        "--warmup",
        "0s",
        "--concurrency",
        "2",
        "--connections",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(tls.clone());
    let out = run(a).await.expect("join");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the client certificate: refused by the service.
    let out = run(vec![
        "run".into(),
        "--server".into(),
        url.clone(),
        "--count".into(),
        "500".into(),
        "--duration".into(),
        "300ms".into(),
        "--ca-cert".into(),
        path("ca.pem"),
    ])
    .await
    .expect("join");
    assert!(!out.status.success());
    let _ = stop.send(());
}
