//! The SVG `compare` writes: deliveries per second against the number of
//! clients, and p99 latency against the number of clients, one line per
//! server, both on logarithmic axes (the data spans decades), with one
//! legend under both panels.
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

const WIDTH: u32 = 1280;
const PANELS_HEIGHT: u32 = 520;
/// Height of one row of the legend under the panels.
const LEGEND_ROW: u32 = 28;

/// Writes both panels side by side to `path`, with one legend under them.
/// `throughput` is in deliveries per second, `p99` in milliseconds; both name
/// the same servers in the same order, so a server has one colour in both.
pub fn write_svg(path: &Path, throughput: &[Series], p99: &[Series]) -> anyhow::Result<()> {
    let places = legend_places(throughput);
    let rows = places.last().map_or(0, |&(_, row)| row + 1);
    let height = PANELS_HEIGHT + rows * LEGEND_ROW + 16;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (panels, legend_strip) = root.split_vertically(PANELS_HEIGHT);
    let (left, right) = panels.split_horizontally(WIDTH / 2);
    // Logarithmic in y as well: the seed and our models are two decades
    // apart in throughput, and p99 spans milliseconds to tens of seconds.
    panel(
        &left,
        "fanout: deliveries per second",
        "deliveries/s",
        throughput,
        &si_label,
    )?;
    panel(&right, "fanout: p99 latency", "ms", p99, &|ms| {
        plain_label(*ms)
    })?;
    legend(&legend_strip, throughput, &places)?;
    root.present()
        .map_err(plot_error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn plot_error<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {err:?}")
}

/// 250000 as "250 k", 3e7 as "30 M": what a reader compares at a glance.
fn si_label(value: &f64) -> String {
    let v = *value;
    if v >= 1e6 {
        format!("{} M", plain_label(v / 1e6))
    } else if v >= 1e3 {
        format!("{} k", plain_label(v / 1e3))
    } else {
        plain_label(v)
    }
}

/// Whole numbers without a ".0", small ones with the digits that matter.
fn plain_label(v: f64) -> String {
    if v >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        // Two significant digits, then trailing zeros dropped.
        let decimals = ((-v.log10()).ceil() as usize + 1).min(9);
        let text = format!("{v:.decimals$}");
        text.trim_end_matches('0').to_owned()
    }
}

/// 1, 2 and 5 times each power of ten from `low` to `high`: plotters marks
/// only the decades on a log axis, too few when the data spans one or two.
fn steps(low: f64, high: f64) -> Vec<f64> {
    let mut marks = Vec::new();
    let mut decade = 10f64.powf(low.log10().floor());
    while decade <= high {
        for step in [1.0, 2.0, 5.0] {
            let mark = decade * step;
            if (low..=high).contains(&mark) {
                marks.push(mark);
            }
        }
        decade *= 10.0;
    }
    marks
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &[Series],
    y_label: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()> {
    // A log axis has no place for zero (a server that delivered nothing).
    let drawable = |s: &'_ Series| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .copied()
            .filter(|&(x, y)| x > 0.0 && y > 0.0)
            .collect()
    };
    let series: Vec<(usize, Vec<(f64, f64)>)> = series.iter().map(drawable).enumerate().collect();
    let points = || series.iter().flat_map(|(_, points)| points.iter());
    let (mut x_min, mut x_max) = (f64::MAX, f64::MIN);
    let (mut y_min, mut y_max) = (f64::MAX, f64::MIN);
    for &(x, y) in points() {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if x_min > x_max {
        // Nothing to draw: leave the panel with its title only.
        area.titled(title, ("sans-serif", 20)).map_err(plot_error)?;
        return Ok(());
    }
    // A log axis needs a range that is positive and not a single point.
    let x_range = (x_min * 0.8).max(0.5)..(x_max * 1.25).max(x_min + 1.0);
    let y_low = (y_min * 0.7).max(1e-3);
    let y_range = y_low..(y_max * 1.5).max(y_low * 10.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(
            x_range.log_scale(),
            y_range
                .log_scale()
                .with_key_points(steps(y_low, y_max * 1.5)),
        )
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("clients (n)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .x_label_formatter(&|n| plain_label(*n))
        .y_label_formatter(y_label)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_error)?;
    for (i, points) in &series {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(plot_error)?;
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(plot_error)?;
    }
    Ok(())
}

/// Where each server's legend entry goes: (x, row), left to right,
/// wrapping before the right edge.
fn legend_places(series: &[Series]) -> Vec<(i32, u32)> {
    const LEFT: i32 = 80;
    let mut places = Vec::with_capacity(series.len());
    let (mut x, mut row) = (LEFT, 0);
    for s in series {
        // Swatch, about 8 px per character of the name, then a gap.
        let width = 30 + 8 * s.name.chars().count() as i32 + 32;
        if x > LEFT && x + width > WIDTH as i32 - 20 {
            x = LEFT;
            row += 1;
        }
        places.push((x, row));
        x += width;
    }
    places
}

/// Colour swatches and names, outside both panels so that the legend can
/// never hide a line.
fn legend(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    series: &[Series],
    places: &[(i32, u32)],
) -> anyhow::Result<()> {
    let style = ("sans-serif", 16).into_font().color(&BLACK);
    for (i, (s, &(x, row))) in series.iter().zip(places).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let y = (row * LEGEND_ROW + LEGEND_ROW / 2 + 8) as i32;
        area.draw(&PathElement::new(
            vec![(x, y), (x + 24, y)],
            colour.stroke_width(3),
        ))
        .map_err(plot_error)?;
        area.draw(&Text::new(s.name.as_str(), (x + 30, y - 8), style.clone()))
            .map_err(plot_error)?;
    }
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
        // Axis labels read as numbers a person would write.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        assert!(
            texts.contains(&"100") && texts.contains(&"1 M"),
            "{texts:?}"
        );
        assert!(!svg.contains("100.0"), "x labels with a fraction");
        assert!(svg.contains("sharded") && svg.contains("seed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_long_legend_wraps_and_a_zero_is_left_out() {
        let servers: Vec<Series> = (0..12)
            .map(|i| Series {
                name: format!("server-number-{i}"),
                points: vec![(10.0, if i == 0 { 0.0 } else { 1e6 }), (100.0, 2e6)],
            })
            .collect();
        let places = legend_places(&servers);
        assert!(places.iter().all(|&(x, _)| x < WIDTH as i32));
        assert!(places.last().is_some_and(|&(_, row)| row >= 1));
        let dir = std::env::temp_dir().join(format!("chat-load-legend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.svg");
        write_svg(&path, &servers, &servers).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("server-number-11"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_axis_marks_one_two_five() {
        assert_eq!(
            steps(150_000.0, 45e6),
            vec![2e5, 5e5, 1e6, 2e6, 5e6, 1e7, 2e7]
        );
        assert_eq!(steps(0.3, 3.0), vec![0.5, 1.0, 2.0]);
    }

    #[test]
    fn labels_read_like_a_person_wrote_them() {
        assert_eq!(si_label(&250_000.0), "250 k");
        assert_eq!(si_label(&30_000_000.0), "30 M");
        assert_eq!(si_label(&2_500_000.0), "2.5 M");
        assert_eq!(plain_label(1000.0), "1000");
        assert_eq!(plain_label(0.25), "0.25");
        assert_eq!(plain_label(0.1), "0.1");
        assert_eq!(plain_label(0.0004), "0.0004");
        assert_eq!(plain_label(0.0), "0");
    }
}
