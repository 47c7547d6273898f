//! `--chart FILE.svg`: throughput and p99 latency against the swept parameter (connections,
//! depth, subscribers, …), one line per system, drawn with plotters' SVG backend.

use crate::error::BenchError;
use plotters::prelude::*;
use std::path::Path;

/// One measured point: the swept value, throughput (per second), p99 (µs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub throughput: f64,
    pub p99_us: f64,
}

/// One line: a system's points in sweep order.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

const WIDTH_PX: u32 = 1100;
const HEIGHT_PX: u32 = 440;
const COLORS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];

fn chart_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Chart(e.to_string())
}

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
pub fn draw(
    path: &Path,
    title: &str,
    x_label: &str,
    throughput_label: &str,
    series: &[Series],
) -> Result<(), BenchError> {
    let all: Vec<&Point> = series.iter().flat_map(|s| &s.points).collect();
    if all.is_empty() {
        return Err(BenchError::Chart("nothing to draw".into()));
    }
    let x_max = all.iter().map(|p| p.x).fold(1.0, f64::max) * 1.05;
    let x_min = all.iter().map(|p| p.x).fold(f64::MAX, f64::min).min(x_max) * 0.95;
    let t_max = all.iter().map(|p| p.throughput).fold(1.0, f64::max) * 1.1;
    let l_max = all.iter().map(|p| p.p99_us / 1000.0).fold(0.1, f64::max) * 1.1;

    let root = SVGBackend::new(path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(chart_err)?;
    let (left, right) = root.split_horizontally(WIDTH_PX / 2);
    let panels: [(
        DrawingArea<SVGBackend, plotters::coord::Shift>,
        &str,
        f64,
        bool,
    ); 2] = [
        (left, throughput_label, t_max, true),
        (right, "p99 latency (ms)", l_max, false),
    ];
    for (area, y_label, y_max, is_throughput) in panels {
        let mut chart = ChartBuilder::on(&area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(x_min..x_max, 0.0..y_max)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(chart_err)?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| {
                    let y = if is_throughput {
                        p.throughput
                    } else {
                        p.p99_us / 1000.0
                    };
                    (p.x, y)
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(chart_err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(chart_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(chart_err)?;
    }
    root.present().map_err(chart_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_both_panels() {
        // Proves a two-series chart renders to an SVG file naming both series.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let s = |name: &str, k: f64| Series {
            name: name.into(),
            points: (1..4)
                .map(|i| Point {
                    x: i as f64 * 8.0,
                    throughput: k * i as f64,
                    p99_us: 1000.0 * i as f64,
                })
                .collect(),
        };
        draw(
            &path,
            "t",
            "connections",
            "msgs/s",
            &[s("fabric", 1e5), s("nats", 5e4)],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("fabric") && svg.contains("nats"));
    }
}
