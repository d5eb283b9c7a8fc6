//! A self-contained HTML page of one or more runs, side by side (as ghz does for gRPC and vegeta's
//! plot for HTTP): numbers answered each second, the latency histogram, and the percentiles. No
//! script and no external file: inline SVG and CSS, well-formed XML (so a test can parse it), to
//! open anywhere or attach to a ticket.

use std::fmt::Write;

use crate::Report;

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 260.0;
const PAD: f64 = 48.0;

/// Text safe inside XML elements and attributes.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A report's name in the charts: its target, mode and batch.
fn label(r: &Report) -> String {
    let rate = if r.rate > 0.0 {
        format!(" at {:.0}/s", r.rate)
    } else {
        String::new()
    };
    format!(
        "{} {} {} x{}{rate}",
        if r.target.is_empty() {
            "run"
        } else {
            &r.target
        },
        r.mode,
        r.batch,
        r.concurrency
    )
}

/// The page for `reports`, titled `title`.
pub fn html(title: &str, reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n\
         <meta charset=\"utf-8\"/>\n<title>{t}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 2em; color: #222; }}\n\
         table {{ border-collapse: collapse; }}\n\
         th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}\n\
         th:first-child, td:first-child {{ text-align: left; }}\n\
         svg {{ background: #fafafa; border: 1px solid #ddd; }}\n\
         .leak {{ color: #b00; font-weight: bold; }}\n\
         </style>\n</head>\n<body>\n<h1>{t}</h1>\n",
        t = esc(title)
    );
    out.push_str("<h2>Runs</h2>\n");
    metadata(&mut out, reports);
    out.push_str("<h2>Percentiles</h2>\n");
    table(&mut out, reports);
    out.push_str("<h2>Requests by status code</h2>\n");
    codes(&mut out, reports);
    out.push_str("<h2>NHS numbers answered each second</h2>\n");
    throughput(&mut out, reports);
    out.push_str("<h2>Latency over time (p99 solid, p50 dashed), ms</h2>\n");
    latency_over_time(&mut out, reports);
    out.push_str("<h2>Latency histogram (share of requests per bucket)</h2>\n");
    histogram(&mut out, reports);
    out.push_str("</body>\n</html>\n");
    out
}

fn table(out: &mut String, reports: &[Report]) {
    out.push_str(
        "<table id=\"percentiles\">\n<tr><th>run</th><th>numbers/s</th><th>requests/s</th>\
         <th>p50 us</th><th>p90 us</th><th>p99 us</th><th>p99.9 us</th><th>max us</th>\
         <th>errors</th><th>leaks</th></tr>\n",
    );
    for r in reports {
        let errors: u64 = r.errors.values().sum();
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{errors}</td><td{}>{}</td></tr>",
            esc(&label(r)),
            r.numbers_per_second,
            r.requests_per_second,
            r.latency_us.p50,
            r.latency_us.p90,
            r.latency_us.p99,
            r.latency_us.p999,
            r.latency_us.max,
            if r.leaks + r.warmup_leaks > 0 && r.target != "echo" {
                " class=\"leak\""
            } else {
                ""
            },
            r.leaks + r.warmup_leaks
        );
    }
    out.push_str("</table>\n");
}

fn legend(out: &mut String, reports: &[Report]) {
    for (i, r) in reports.iter().enumerate() {
        let y = 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            out,
            "<rect x=\"{:.0}\" y=\"{:.0}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\">{}</text>",
            WIDTH - 230.0,
            y - 9.0,
            COLOURS[i % COLOURS.len()],
            WIDTH - 215.0,
            y,
            esc(&label(r))
        );
    }
}

fn axes(out: &mut String, y_max: f64, y_unit: &str, x_label: &str) {
    let _ = writeln!(
        out,
        "<line x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#555\"/>\
         <line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{b}\" stroke=\"#555\"/>\
         <text x=\"4\" y=\"{t}\" font-size=\"11\">{top}</text>\
         <text x=\"4\" y=\"{b}\" font-size=\"11\">0</text>\
         <text x=\"{mid}\" y=\"{xl}\" font-size=\"11\">{x}</text>",
        b = HEIGHT - PAD,
        r = WIDTH - PAD,
        t = PAD + 4.0,
        top = esc(&format!("{y_max:.0}{y_unit}")),
        mid = WIDTH / 2.0 - 40.0,
        xl = HEIGHT - 12.0,
        x = esc(x_label),
    );
}

fn throughput(out: &mut String, reports: &[Report]) {
    let seconds = reports
        .iter()
        .map(|r| r.numbers_each_second.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let y_max = reports
        .iter()
        .flat_map(|r| r.numbers_each_second.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let _ = writeln!(
        out,
        "<svg id=\"throughput\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" \
         height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\">"
    );
    axes(out, y_max, "", "seconds of the measured window");
    let x = |i: usize| PAD + (WIDTH - 2.0 * PAD) * i as f64 / (seconds - 1) as f64;
    let y = |v: u64| HEIGHT - PAD - (HEIGHT - 2.0 * PAD) * v as f64 / y_max;
    for (i, r) in reports.iter().enumerate() {
        let points: Vec<String> = r
            .numbers_each_second
            .iter()
            .enumerate()
            .map(|(s, v)| format!("{:.1},{:.1}", x(s), y(*v)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"{}\" points=\"{}\">\
             <title>{}</title></polyline>",
            COLOURS[i % COLOURS.len()],
            points.join(" "),
            esc(&label(r))
        );
    }
    legend(out, reports);
    out.push_str("</svg>\n");
}

fn histogram(out: &mut String, reports: &[Report]) {
    // The buckets of every report, in order (each report's histogram doubles from 100 us).
    let mut bounds: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.latency_histogram_us.iter().map(|(b, _)| *b))
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let share = |r: &Report, bound: u64| -> f64 {
        let total: u64 = r.latency_histogram_us.iter().map(|(_, c)| c).sum();
        let n = r
            .latency_histogram_us
            .iter()
            .find(|(b, _)| *b == bound)
            .map_or(0, |(_, c)| *c);
        if total == 0 {
            0.0
        } else {
            100.0 * n as f64 / total as f64
        }
    };
    let y_max = bounds
        .iter()
        .flat_map(|b| reports.iter().map(move |r| share(r, *b)))
        .fold(1.0, f64::max);
    let _ = writeln!(
        out,
        "<svg id=\"latency\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" \
         height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\">"
    );
    axes(out, y_max, "%", "latency bucket (upper bound)");
    let groups = bounds.len().max(1) as f64;
    let group_w = (WIDTH - 2.0 * PAD) / groups;
    let bar_w = (group_w * 0.8 / reports.len().max(1) as f64).max(1.0);
    for (g, bound) in bounds.iter().enumerate() {
        let gx = PAD + group_w * g as f64;
        for (i, r) in reports.iter().enumerate() {
            let v = share(r, *bound);
            let h = (HEIGHT - 2.0 * PAD) * v / y_max;
            let _ = writeln!(
                out,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
                 <title>{}: {:.1}% at most {} us</title></rect>",
                gx + group_w * 0.1 + bar_w * i as f64,
                HEIGHT - PAD - h,
                bar_w,
                h,
                COLOURS[i % COLOURS.len()],
                esc(&label(r)),
                v,
                bound
            );
        }
        if g % 2 == 0 {
            let text = if *bound >= 1000 {
                format!("{}ms", bound / 1000)
            } else {
                format!("{bound}us")
            };
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\">{}</text>",
                gx,
                HEIGHT - PAD + 12.0,
                esc(&text)
            );
        }
    }
    legend(out, reports);
    out.push_str("</svg>\n");
}

/// Each run's command, start and the server's build (as it reported it).
fn metadata(out: &mut String, reports: &[Report]) {
    out.push_str("<table id=\"runs\">\n<tr><th>run</th><th>started</th><th>server</th><th>command</th></tr>\n");
    for r in reports {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&label(r)),
            esc(&r.started_at),
            esc(if r.server_version.is_empty() {
                "not asked"
            } else {
                &r.server_version
            }),
            esc(&r.command)
        );
    }
    out.push_str("</table>\n");
}

/// Requests by gRPC status code: OK (answered) and each error code, a column a code.
fn codes(out: &mut String, reports: &[Report]) {
    let mut names: Vec<&str> = reports
        .iter()
        .flat_map(|r| r.errors.keys().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    out.push_str("<table id=\"codes\">\n<tr><th>run</th><th>OK</th>");
    for n in &names {
        let _ = write!(out, "<th>{}</th>", esc(n));
    }
    out.push_str("</tr>\n");
    for r in reports {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td>",
            esc(&label(r)),
            r.requests
        );
        for n in &names {
            let _ = write!(out, "<td>{}</td>", r.errors.get(*n).copied().unwrap_or(0));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

/// Each second's p50 (dashed) and p99 (solid) latency, a pair of lines a report.
fn latency_over_time(out: &mut String, reports: &[Report]) {
    let seconds = reports
        .iter()
        .map(|r| r.latency_each_second_us.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let y_max = reports
        .iter()
        .flat_map(|r| r.latency_each_second_us.iter().map(|(_, p99)| *p99))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let _ = writeln!(
        out,
        "<svg id=\"latency-over-time\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" \
         height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\">"
    );
    axes(out, y_max / 1000.0, " ms", "seconds of the measured window");
    let x = |i: usize| PAD + (WIDTH - 2.0 * PAD) * i as f64 / (seconds - 1) as f64;
    let y = |v: u64| HEIGHT - PAD - (HEIGHT - 2.0 * PAD) * v as f64 / y_max;
    for (i, r) in reports.iter().enumerate() {
        for (dash, pick) in [("", 1usize), (" stroke-dasharray=\"4 3\"", 0)] {
            let points: Vec<String> = r
                .latency_each_second_us
                .iter()
                .enumerate()
                .map(|(s, p)| format!("{:.1},{:.1}", x(s), y(if pick == 0 { p.0 } else { p.1 })))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"{}\"{dash} points=\"{}\">\
                 <title>{} {}</title></polyline>",
                COLOURS[i % COLOURS.len()],
                points.join(" "),
                esc(&label(r)),
                if pick == 0 { "p50" } else { "p99" }
            );
        }
    }
    legend(out, reports);
    out.push_str("</svg>\n");
}
