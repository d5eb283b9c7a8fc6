//! Pass/fail criteria of a run, as k6 has them: `--threshold 'p99<5ms'`. A run whose figures break
//! one exits non-zero, so a pipeline can gate on it.

use std::fmt;

use crate::Report;

/// One criterion: a figure of the report, a comparison, a bound.
#[derive(Clone, Debug, PartialEq)]
pub struct Threshold {
    text: String,
    figure: Figure,
    op: Op,
    bound: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Figure {
    /// A latency percentile (or the maximum), in microseconds.
    Latency(Percentile),
    /// NHS numbers per second.
    Rate,
    /// Requests per second.
    RequestRate,
    /// Failed requests over all requests.
    ErrorRate,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Percentile {
    P50,
    P90,
    P99,
    P999,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
}

impl Threshold {
    /// `p50|p90|p99|p99.9|max` `<|<=|>|>=` a length of time (`5ms`, `250us`, `1s`);
    /// `rate` or `req_rate` against a number a second; `error_rate` against a share (0.01).
    pub fn parse(s: &str) -> Result<Threshold, String> {
        let text = s.trim().to_string();
        let at = text.find(['<', '>']).ok_or_else(|| {
            format!("{s:?}: no comparison; write e.g. p99<5ms, rate>=100000, error_rate<0.01")
        })?;
        let (name, rest) = (text[..at].trim(), &text[at..]);
        let (op, bound) = match rest
            .strip_prefix("<=")
            .map(|b| (Op::Le, b))
            .or_else(|| rest.strip_prefix(">=").map(|b| (Op::Ge, b)))
            .or_else(|| rest.strip_prefix('<').map(|b| (Op::Lt, b)))
            .or_else(|| rest.strip_prefix('>').map(|b| (Op::Gt, b)))
        {
            Some(x) => x,
            None => return Err(format!("{s:?}: no comparison")),
        };
        let bound = bound.trim();
        let latency = |f: Percentile| -> Result<(Figure, f64), String> {
            let d = crate::length_of_time(bound).map_err(|e| format!("{s:?}: {e}"))?;
            Ok((Figure::Latency(f), d.as_secs_f64() * 1e6))
        };
        let number = |figure| -> Result<(Figure, f64), String> {
            bound
                .parse::<f64>()
                .map(|b| (figure, b))
                .map_err(|_| format!("{s:?}: {bound:?} is not a number"))
        };
        let (figure, bound) = match name {
            "p50" => latency(Percentile::P50)?,
            "p90" => latency(Percentile::P90)?,
            "p99" => latency(Percentile::P99)?,
            "p99.9" => latency(Percentile::P999)?,
            "max" => latency(Percentile::Max)?,
            "rate" => number(Figure::Rate)?,
            "req_rate" => number(Figure::RequestRate)?,
            "error_rate" => number(Figure::ErrorRate)?,
            other => {
                return Err(format!(
                    "{s:?}: {other:?} is not a figure; one of p50, p90, p99, p99.9, max, rate, \
                     req_rate, error_rate"
                ));
            }
        };
        Ok(Threshold {
            text,
            figure,
            op,
            bound,
        })
    }

    /// The report's figure, and whether it holds. A latency of a run that answered no request
    /// holds nothing (NaN): no request is not a fast one.
    pub fn check(&self, r: &Report) -> (f64, bool) {
        if matches!(self.figure, Figure::Latency(_)) && r.requests == 0 {
            return (f64::NAN, false);
        }
        let value = match self.figure {
            Figure::Latency(p) => {
                let l = &r.latency_us;
                (match p {
                    Percentile::P50 => l.p50,
                    Percentile::P90 => l.p90,
                    Percentile::P99 => l.p99,
                    Percentile::P999 => l.p999,
                    Percentile::Max => l.max,
                }) as f64
            }
            Figure::Rate => r.numbers_per_second,
            Figure::RequestRate => r.requests_per_second,
            Figure::ErrorRate => {
                let failed: u64 = r.errors.values().sum();
                let all = r.requests + failed;
                if all == 0 {
                    1.0
                } else {
                    failed as f64 / all as f64
                }
            }
        };
        let holds = match self.op {
            Op::Lt => value < self.bound,
            Op::Le => value <= self.bound,
            Op::Gt => value > self.bound,
            Op::Ge => value >= self.bound,
        };
        (value, holds)
    }

    /// The figure as the threshold writes it (latencies in ms).
    pub fn shown(&self, value: f64) -> String {
        if value.is_nan() {
            return "no request answered".into();
        }
        match self.figure {
            Figure::Latency(_) => format!("{:.3}ms", value / 1000.0),
            Figure::ErrorRate => format!("{value:.4}"),
            _ => format!("{value:.0}"),
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_as_k6_writes_them() {
        let r = Report {
            requests: 990,
            numbers_per_second: 120_000.0,
            latency_us: crate::Latency {
                p99: 4_200,
                ..Default::default()
            },
            errors: [("Unavailable".to_string(), 10)].into(),
            ..Default::default()
        };
        let check = |s: &str| Threshold::parse(s).expect(s).check(&r);
        assert_eq!(check("p99<5ms"), (4_200.0, true));
        assert!(!check("p99 < 4ms").1);
        assert!(check("p99<=4200us").1);
        assert!(check("rate>=100000").1);
        assert!(!check("rate>200000").1);
        assert_eq!(check("error_rate<0.02"), (0.01, true));
        assert!(!check("error_rate<0.001").1);
        assert!(Threshold::parse("p42<5ms").is_err_and(|e| e.contains("not a figure")));
        let none = Report::default();
        let (v, holds) = Threshold::parse("p99<5ms").expect("parses").check(&none);
        assert!(
            v.is_nan() && !holds,
            "no request answered is not a fast run"
        );
        assert!(Threshold::parse("p99=5ms").is_err_and(|e| e.contains("no comparison")));
        assert!(Threshold::parse("p99<5").is_err_and(|e| e.contains("unit")));
    }
}
