//! The SVG `compare` writes: deliveries per second against the number of
//! clients, and p99 latency against the number of clients, one line per
//! server, both on logarithmic axes where the data spans decades.
//!
//! Drawn with `plotters`' SVG backend and its built-in text estimate (no
//! font files needed: the SVG names a font family and the viewer draws it).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// One server's points: (clients, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Colours that stay distinguishable on white, cycled.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Writes both panels side by side to `path`. `throughput` is in deliveries
/// per second, `p99` in milliseconds.
pub fn write_svg(path: &Path, throughput: &[Series], p99: &[Series]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1280, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (left, right) = root.split_horizontally(640);
    panel(
        &left,
        "fanout: deliveries/s (millions)",
        throughput,
        1e-6,
        false,
    )?;
    panel(&right, "fanout: p99 latency (ms)", p99, 1.0, true)?;
    root.present()
        .map_err(plot_error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn plot_error<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {err:?}")
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
    scale: f64,
    log_y: bool,
) -> anyhow::Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max) = (f64::MAX, f64::MIN);
    let mut y_max = f64::MIN;
    let mut y_min = f64::MAX;
    for &(x, y) in points() {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y * scale);
        y_max = y_max.max(y * scale);
    }
    if x_min > x_max {
        // Nothing to draw: leave the panel with its title only.
        area.titled(title, ("sans-serif", 20)).map_err(plot_error)?;
        return Ok(());
    }
    // A log axis needs a range that is positive and not a single point.
    let x_range = (x_min * 0.8).max(0.5)..(x_max * 1.25).max(x_min + 1.0);
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if log_y {
        let low = (y_min * 0.7).max(1e-3);
        let high = (y_max * 1.5).max(low * 10.0);
        let mut chart = chart
            .build_cartesian_2d(x_range.log_scale(), (low..high).log_scale())
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("clients (n)")
            .y_desc("ms")
            .draw()
            .map_err(plot_error)?;
        draw_series(&mut chart, series, scale)?;
    } else {
        let high = (y_max * 1.15).max(1e-6);
        let mut chart = chart
            .build_cartesian_2d(x_range.log_scale(), 0.0..high)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("clients (n)")
            .y_desc("M deliveries/s")
            .draw()
            .map_err(plot_error)?;
        draw_series(&mut chart, series, scale)?;
    }
    Ok(())
}

fn draw_series<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: &[Series],
    scale: f64,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x, y * scale)).collect();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_one_line_per_server() {
        let dir = std::env::temp_dir().join(format!("chat-load-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.svg");
        let series = |name: &str, k: f64| Series {
            name: name.into(),
            points: vec![(10.0, 1e6 * k), (100.0, 2e6 * k), (1000.0, 1.5e6 * k)],
        };
        write_svg(
            &path,
            &[series("sharded", 4.0), series("seed", 0.1)],
            &[series("sharded", 1e-6)],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("sharded") && svg.contains("seed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
