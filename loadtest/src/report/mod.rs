//! A self-contained HTML page of one or more runs, side by side (as ghz does for gRPC and vegeta's
//! plot for HTTP): the runs' metadata, the percentiles, requests by status code, numbers answered
//! each second, latency over time and the latency histogram. The page is a minijinja template
//! (`page.html`, HTML escaping on); the charts are drawn by plotters as inline SVG. No script and
//! no external file, well-formed XML (so a test can parse it), to open anywhere or attach to a
//! ticket.

use minijinja::{Environment, Value, context};
use plotters::prelude::*;
use serde::Serialize;

use crate::Report;

/// The colour of each run, in order (plotters' SVG writes them as `#1F77B4`).
pub const COLOURS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
];
const SIZE: (u32, u32) = (720, 280);

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// A report's name in the tables and legends: its target, mode and batch.
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

/// One run's row in the page's tables.
#[derive(Serialize)]
struct Row {
    label: String,
    started_at: String,
    server: String,
    command: String,
    numbers_per_second: String,
    requests_per_second: String,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    errors: u64,
    leaks: u64,
    leaked: bool,
    requests: u64,
    by_code: Vec<u64>,
}

/// The page for `reports`, titled `title`.
pub fn html(title: &str, reports: &[Report]) -> String {
    let mut codes: Vec<&str> = reports
        .iter()
        .flat_map(|r| r.errors.keys().map(String::as_str))
        .collect();
    codes.sort_unstable();
    codes.dedup();
    let runs: Vec<Row> = reports
        .iter()
        .map(|r| Row {
            label: label(r),
            started_at: r.started_at.clone(),
            server: if r.server_version.is_empty() {
                "not asked".into()
            } else {
                r.server_version.clone()
            },
            command: r.command.clone(),
            numbers_per_second: format!("{:.0}", r.numbers_per_second),
            requests_per_second: format!("{:.0}", r.requests_per_second),
            p50: r.latency_us.p50,
            p90: r.latency_us.p90,
            p99: r.latency_us.p99,
            p999: r.latency_us.p999,
            max: r.latency_us.max,
            errors: r.errors.values().sum(),
            leaks: r.leaks + r.warmup_leaks,
            leaked: r.leaks + r.warmup_leaks > 0 && r.target != "echo",
            requests: r.requests,
            by_code: codes
                .iter()
                .map(|c| r.errors.get(*c).copied().unwrap_or(0))
                .collect(),
        })
        .collect();
    let mut env = Environment::new();
    // The name ends in .html, so minijinja escapes every value but the charts (marked safe: SVG
    // that plotters wrote, its text escaped by plotters).
    let page = env
        .add_template("page.html", include_str!("page.html"))
        .and_then(|()| env.get_template("page.html"))
        .and_then(|t| {
            t.render(context! {
                title,
                runs,
                codes,
                throughput => Value::from_safe_string(throughput(reports)),
                latency_over_time => Value::from_safe_string(latency_over_time(reports)),
                histogram => Value::from_safe_string(histogram(reports)),
            })
        });
    // The template is part of the program and its values are plain data: a failure is a bug,
    // said on the page rather than losing the run's figures, which the JSON report still holds.
    page.unwrap_or_else(|e| {
        format!(
            "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>the report \
             page failed (a bug): {}</p></body></html>\n",
            e.to_string()
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        )
    })
}

/// Draws a chart into an SVG string; a drawing error (none is expected: the backend writes to a
/// string) leaves a note in its place.
fn svg(
    draw: impl FnOnce(&DrawingArea<SVGBackend, plotters::coord::Shift>) -> DrawResult,
) -> String {
    let mut out = String::new();
    let result = {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(|e| e.to_string()))
    };
    match result {
        Ok(()) => out,
        Err(e) => format!(
            "<p>chart failed: {}</p>",
            e.replace('&', "&amp;").replace('<', "&lt;")
        ),
    }
}

type DrawResult = Result<(), String>;

/// A run's square in a legend (10 wide, so a test can tell it from a bar).
fn legend_box(colour: RGBColor) -> impl Fn((i32, i32)) -> Rectangle<(i32, i32)> {
    move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
}

/// A run's lines, each a list of (seconds, value) points; the first is drawn thick.
type Lines = Vec<Vec<(f64, f64)>>;

/// One line a run: `series(r)` gives its points (x in seconds of the measured window).
fn lines(
    root: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    reports: &[Report],
    y_desc: &str,
    series: &dyn Fn(&Report) -> Lines,
) -> DrawResult {
    let all: Vec<Lines> = reports.iter().map(series).collect();
    let x_max = all
        .iter()
        .flatten()
        .flatten()
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let y_max = all
        .iter()
        .flatten()
        .flatten()
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let mut chart = ChartBuilder::on(root)
        .margin(10)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds of the measured window")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (r, lines)) in reports.iter().zip(&all).enumerate() {
        for (k, points) in lines.iter().enumerate() {
            // The first line of a run is drawn thick (throughput; p99), the second thin (p50).
            let width = if k == 0 { 2 } else { 1 };
            let drawn = chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour(i).stroke_width(width),
                ))
                .map_err(|e| e.to_string())?;
            if k == 0 {
                drawn.label(label(r)).legend(legend_box(colour(i)));
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())
}

/// NHS numbers answered each second, a line a run.
fn throughput(reports: &[Report]) -> String {
    svg(|root| {
        lines(root, reports, "numbers/s", &|r| {
            vec![
                r.numbers_each_second
                    .iter()
                    .enumerate()
                    .map(|(s, n)| (s as f64, *n as f64))
                    .collect(),
            ]
        })
    })
}

/// Each second's p99 (thick) and p50 (thin) latency in ms, a pair of lines a run.
fn latency_over_time(reports: &[Report]) -> String {
    svg(|root| {
        lines(root, reports, "ms", &|r| {
            let at = |pick: fn(&(u64, u64)) -> u64| {
                r.latency_each_second_us
                    .iter()
                    .enumerate()
                    .map(|(s, p)| (s as f64, pick(p) as f64 / 1000.0))
                    .collect()
            };
            vec![at(|p| p.1), at(|p| p.0)]
        })
    })
}

/// The share of each run's requests in each latency bucket, a bar a bucket and run.
fn histogram(reports: &[Report]) -> String {
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
        .fold(1.0, f64::max)
        * 1.1;
    // Group g is centred on x = g, where its tick and label are.
    let bucket = |x: &f64| -> String {
        if x.fract().abs() > 1e-9 || *x < 0.0 {
            return String::new();
        }
        let Some(b) = bounds.get(*x as usize) else {
            return String::new();
        };
        if *b >= 1000 {
            format!("{:.1}ms", *b as f64 / 1000.0)
        } else {
            format!("{b}us")
        }
    };
    let groups = bounds.len().max(1);
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(-0.5..groups as f64 - 0.5, 0.0..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.min(12))
            .x_label_formatter(&bucket)
            .x_desc("latency bucket (upper bound)")
            .y_desc("% of requests")
            .draw()
            .map_err(|e| e.to_string())?;
        let width = 0.8 / reports.len().max(1) as f64;
        for (i, r) in reports.iter().enumerate() {
            let bars = bounds.iter().enumerate().map(|(g, b)| {
                let x0 = g as f64 - 0.4 + width * i as f64;
                Rectangle::new([(x0, 0.0), (x0 + width, share(r, *b))], colour(i).filled())
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(label(r))
                .legend(legend_box(colour(i)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())
    })
}
