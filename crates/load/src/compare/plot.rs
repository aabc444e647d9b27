//! The SVG `compare` writes, one panel per question, one line (and one
//! colour) per server, one legend under all panels:
//!
//! - fanout: deliveries per second against the number of clients, and p99
//!   latency against the number of clients, both on logarithmic axes (the
//!   data spans decades), the x axis marked at the fanout points run;
//! - rate: latency at p50, p99 and p99.9 (logarithmic);
//! - idle: server memory per idle connection once settled and after holding.
//!
//! A point drawn hollow is an incomplete run (cut short by its time bound,
//! or missing deliveries or announcements), as the table's `(incomplete)`
//! marks it; the legend says so whenever such a point is drawn.
//!
//! Drawn with `plotters`' SVG backend and its built-in text estimate (no
//! font files needed: the SVG names a font family and the viewer draws it).

use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One plotted value: x (clients, or a category's index), y, and whether
/// the run it comes from completed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Point {
    pub(crate) x: f64,
    pub(crate) y: f64,
    pub(crate) complete: bool,
}

/// One server's points in one panel.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<Point>,
}

/// A panel whose x axis names categories (`p50`, `p99`, ...) rather than
/// numbers, with the servers' series over them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CategoryPanel {
    pub(crate) title: String,
    pub(crate) categories: Vec<&'static str>,
    pub(crate) y_desc: &'static str,
    /// Logarithmic y (latencies span decades) or linear from zero.
    pub(crate) log_y: bool,
    pub(crate) series: Vec<Series>,
}

/// Everything the SVG shows. Every list of series names the same servers
/// in the same order, so that a server has one colour in every panel.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Figures {
    /// Deliveries per second against n.
    pub(crate) throughput: Vec<Series>,
    /// p99 latency in milliseconds against n.
    pub(crate) p99: Vec<Series>,
    pub(crate) rate: Option<CategoryPanel>,
    pub(crate) idle: Option<CategoryPanel>,
}

impl Figures {
    /// Whether there is anything to draw at all.
    pub(crate) fn is_empty(&self) -> bool {
        let empty = |series: &[Series]| series.iter().all(|s| s.points.is_empty());
        empty(&self.throughput)
            && empty(&self.p99)
            && self.rate.as_ref().is_none_or(|p| empty(&p.series))
            && self.idle.as_ref().is_none_or(|p| empty(&p.series))
    }

    fn servers(&self) -> Vec<&str> {
        let lists = [
            Some(&self.throughput),
            Some(&self.p99),
            self.rate.as_ref().map(|p| &p.series),
            self.idle.as_ref().map(|p| &p.series),
        ];
        lists
            .into_iter()
            .flatten()
            .max_by_key(|list| list.len())
            .map(|list| list.iter().map(|s| s.name.as_str()).collect())
            .unwrap_or_default()
    }

    fn any_incomplete(&self) -> bool {
        let lists = [
            Some(&self.throughput),
            Some(&self.p99),
            self.rate.as_ref().map(|p| &p.series),
            self.idle.as_ref().map(|p| &p.series),
        ];
        lists
            .into_iter()
            .flatten()
            .flatten()
            .any(|s| s.points.iter().any(|p| !p.complete))
    }
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
/// Height of one row of two panels.
const PANELS_HEIGHT: u32 = 520;
/// Height of one row of the legend under the panels.
const LEGEND_ROW: u32 = 28;
/// Radius of a point's marker.
const MARKER: i32 = 5;

/// Writes the panels, two to a row, to `path`, with one legend under them.
pub(crate) fn write_svg(path: &Path, figures: &Figures) -> anyhow::Result<()> {
    let servers = figures.servers();
    let hollow_note = figures.any_incomplete();
    let places = legend_places(&servers, hollow_note);
    let legend_rows = places.last().map_or(0, |&(_, row)| row + 1);
    let second_row = figures.rate.is_some() || figures.idle.is_some();
    let panel_rows = if second_row { 2 } else { 1 };
    let height = panel_rows * PANELS_HEIGHT + legend_rows * LEGEND_ROW + 16;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (panels, legend_strip) = root.split_vertically(panel_rows * PANELS_HEIGHT);
    let (first, second) = panels.split_vertically(PANELS_HEIGHT);
    let (left, right) = first.split_horizontally(WIDTH / 2);
    // Logarithmic in y as well: the seed and our models are two decades
    // apart in throughput, and p99 spans milliseconds to tens of seconds.
    clients_panel(
        &left,
        "fanout: deliveries per second",
        "deliveries/s",
        &figures.throughput,
        &si_label,
    )?;
    clients_panel(&right, "fanout: p99 latency", "ms", &figures.p99, &|ms| {
        plain_label(*ms)
    })?;
    if second_row {
        let (left, right) = second.split_horizontally(WIDTH / 2);
        if let Some(rate) = &figures.rate {
            category_panel(&left, rate, &|ms| plain_label(*ms))?;
        }
        if let Some(idle) = &figures.idle {
            category_panel(&right, idle, &|kib| plain_label(*kib))?;
        }
    }
    legend(&legend_strip, &servers, &places, hollow_note)?;
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

/// The x axis marks of a clients panel: exactly the numbers of clients
/// that were run, each once. Left to plotters, a log axis over a narrow
/// range adds marks between the decades that round to the same label (the
/// axis read `100` twice).
fn client_marks(series: &[Vec<Point>]) -> Vec<f64> {
    let mut marks: Vec<f64> = series.iter().flatten().map(|p| p.x).collect();
    marks.sort_by(f64::total_cmp);
    marks.dedup_by(|a, b| plain_label(*a) == plain_label(*b));
    marks
}

/// A point's marker: filled for a complete run, hollow for an incomplete one.
/// Each server's points as a line with its markers, one colour a server:
/// the same on every panel, whatever its axes.
fn draw_series<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: &[Vec<Point>],
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, points) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.x, p.y)),
                colour.stroke_width(2),
            ))
            .map_err(plot_error)?;
        chart
            .draw_series(points.iter().map(|p| marker(p, colour)))
            .map_err(plot_error)?;
    }
    Ok(())
}

fn marker(point: &Point, colour: RGBColor) -> Circle<(f64, f64), i32> {
    let Point { x, y, complete } = *point;
    let style = if complete {
        colour.filled()
    } else {
        ShapeStyle {
            color: colour.to_rgba(),
            filled: false,
            stroke_width: 2,
        }
    };
    Circle::new((x, y), if complete { MARKER - 1 } else { MARKER }, style)
}

/// What can be drawn of each series, in the series' order (which gives
/// each its colour): on a log axis there is no place for zero or less (a
/// server that delivered nothing).
fn drawable(series: &[Series], log_x: bool, log_y: bool) -> Vec<Vec<Point>> {
    series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|p| (!log_x || p.x > 0.0) && (!log_y || p.y > 0.0))
                .collect()
        })
        .collect()
}

/// The smallest and largest of `values`, `None` if there are none.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((low, high)) => Some((low.min(v), high.max(v))),
    })
}

fn clients_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    y_desc: &str,
    series: &[Series],
    y_label: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()> {
    let series = drawable(series, true, true);
    let points = || series.iter().flatten();
    let (Some((x_min, x_max)), Some((y_min, y_max))) =
        (bounds(points().map(|p| p.x)), bounds(points().map(|p| p.y)))
    else {
        // Nothing to draw: leave the panel with its title only.
        area.titled(title, ("sans-serif", 20)).map_err(plot_error)?;
        return Ok(());
    };
    // A log axis needs a range that is positive and not a single point.
    let x_range = (x_min * 0.8).max(0.5)..(x_max * 1.25).max(x_min + 1.0);
    let y_low = (y_min * 0.7).max(1e-3);
    let y_range = y_low..(y_max * 1.5).max(y_low * 10.0);
    let marks = client_marks(&series);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(
            x_range.log_scale().with_key_points(marks),
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
    draw_series(&mut chart, &series)
}

fn category_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &CategoryPanel,
    y_label: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()> {
    let series = drawable(&panel.series, false, panel.log_y);
    let Some((y_min, y_max)) = bounds(series.iter().flatten().map(|p| p.y)) else {
        area.titled(&panel.title, ("sans-serif", 20))
            .map_err(plot_error)?;
        return Ok(());
    };
    let categories = panel.categories.clone();
    let x_range = -0.5..(categories.len() as f64 - 0.5);
    let category_count = categories.len();
    let x_label = move |x: &f64| {
        let i = x.round();
        categories
            .get(i as usize)
            .filter(|_| (x - i).abs() < 1e-9 && i >= 0.0)
            .map_or(String::new(), |name| (*name).to_owned())
    };
    // The same mesh and series on either y axis; the two chart types
    // differ, so a macro rather than a function generic over both.
    macro_rules! draw {
        ($y_range:expr) => {{
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 20))
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(64)
                .build_cartesian_2d(x_range, $y_range)
                .map_err(plot_error)?;
            chart
                .configure_mesh()
                .y_desc(panel.y_desc)
                // One mark per category: at most that many labels puts
                // plotters' marks on the whole numbers.
                .x_labels(category_count)
                .label_style(("sans-serif", 13))
                .axis_desc_style(("sans-serif", 14))
                .x_label_formatter(&x_label)
                .y_label_formatter(y_label)
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(plot_error)?;
            draw_series(&mut chart, &series)?;
        }};
    }
    if panel.log_y {
        let y_low = (y_min * 0.7).max(1e-3);
        let y_high = (y_max * 1.5).max(y_low * 10.0);
        draw!((y_low..y_high)
            .log_scale()
            .with_key_points(steps(y_low, y_max * 1.5)));
    } else {
        draw!(y_min.min(0.0)..(y_max * 1.15).max(1e-3));
    }
    Ok(())
}

/// Where each legend entry goes: (x, row), left to right, wrapping before
/// the right edge; the servers first, then the note on hollow points.
fn legend_places(servers: &[&str], hollow_note: bool) -> Vec<(i32, u32)> {
    const LEFT: i32 = 80;
    let mut places = Vec::with_capacity(servers.len() + 1);
    let (mut x, mut row) = (LEFT, 0);
    let names = servers.iter().copied();
    let note = hollow_note.then_some(HOLLOW_NOTE);
    for name in names.chain(note) {
        // Swatch, about 8 px per character of the name, then a gap.
        let width = 30 + 8 * name.chars().count() as i32 + 32;
        if x > LEFT && x + width > WIDTH as i32 - 20 {
            x = LEFT;
            row += 1;
        }
        places.push((x, row));
        x += width;
    }
    places
}

/// What a hollow point means, in the legend.
const HOLLOW_NOTE: &str = "hollow point: incomplete run (see compare.md)";

/// Colour swatches and names, outside every panel so that the legend can
/// never hide a line.
fn legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    servers: &[&str],
    places: &[(i32, u32)],
    hollow_note: bool,
) -> anyhow::Result<()> {
    let style = ("sans-serif", 16).into_font().color(&BLACK);
    let y_of = |row: u32| (row * LEGEND_ROW + LEGEND_ROW / 2 + 8) as i32;
    for (i, (name, &(x, row))) in servers.iter().zip(places).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let y = y_of(row);
        area.draw(&PathElement::new(
            vec![(x, y), (x + 24, y)],
            colour.stroke_width(3),
        ))
        .map_err(plot_error)?;
        area.draw(&Text::new(*name, (x + 30, y - 8), style.clone()))
            .map_err(plot_error)?;
    }
    if let (true, Some(&(x, row))) = (hollow_note, places.get(servers.len())) {
        let y = y_of(row);
        let grey = PALETTE[PALETTE.len() - 1];
        area.draw(&Circle::new(
            (x + 12, y),
            MARKER,
            ShapeStyle {
                color: grey.to_rgba(),
                filled: false,
                stroke_width: 2,
            },
        ))
        .map_err(plot_error)?;
        area.draw(&Text::new(HOLLOW_NOTE, (x + 30, y - 8), style.clone()))
            .map_err(plot_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(points: &[(f64, f64)]) -> Vec<Point> {
        points
            .iter()
            .map(|&(x, y)| Point {
                x,
                y,
                complete: true,
            })
            .collect()
    }

    fn fanout_only(throughput: Vec<Series>, p99: Vec<Series>) -> Figures {
        Figures {
            throughput,
            p99,
            rate: None,
            idle: None,
        }
    }

    fn temp_svg(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("chat-load-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.svg");
        (dir, path)
    }

    /// The texts of an SVG, one per line as plotters writes them.
    fn texts(svg: &str) -> Vec<&str> {
        svg.lines().map(str::trim).collect()
    }

    #[test]
    fn writes_an_svg_with_one_line_per_server() {
        let (dir, path) = temp_svg("plot");
        let series = |name: &str, k: f64| Series {
            name: name.into(),
            points: complete(&[(10.0, 1e6 * k), (100.0, 2e6 * k), (1000.0, 1.5e6 * k)]),
        };
        write_svg(
            &path,
            &fanout_only(
                vec![series("sharded", 4.0), series("seed", 0.1)],
                vec![series("sharded", 1e-6)],
            ),
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        // Axis labels read as numbers a person would write.
        let texts = texts(&svg);
        assert!(
            texts.contains(&"100") && texts.contains(&"1 M"),
            "{texts:?}"
        );
        assert!(!svg.contains("100.0"), "x labels with a fraction");
        assert!(svg.contains("sharded") && svg.contains("seed"));
        assert!(!svg.contains(HOLLOW_NOTE), "no incomplete point, no note");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_clients_axis_is_marked_once_at_each_point_run() {
        for clients in [
            &[100.0][..],
            &[10.0, 100.0],
            &[100.0, 200.0],
            &[2.0, 16.0, 128.0, 512.0],
        ] {
            let points: Vec<(f64, f64)> = clients.iter().map(|&n| (n, 3e6)).collect();
            let series = vec![Series {
                name: "x".into(),
                points: complete(&points),
            }];
            let (dir, path) = temp_svg("marks");
            // p99 of 0.3 ms: no y label can read like a client count.
            let p99 = vec![Series {
                name: "x".into(),
                points: complete(&clients.iter().map(|&n| (n, 0.3)).collect::<Vec<_>>()),
            }];
            write_svg(&path, &fanout_only(series, p99)).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            for &n in clients {
                let label = plain_label(n);
                let count = texts(&svg).iter().filter(|t| **t == label).count();
                assert_eq!(count, 2, "{clients:?}: {label} once per panel");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let at = |x, complete| Point {
            x,
            y: 1.0,
            complete,
        };
        let marks = client_marks(&[
            vec![at(100.0, true), at(10.0, true)],
            vec![at(100.0, false)],
        ]);
        assert_eq!(marks, vec![10.0, 100.0]);
    }

    #[test]
    fn incomplete_runs_are_hollow_and_explained() {
        let (dir, path) = temp_svg("hollow");
        let mut points = complete(&[(10.0, 1e6), (100.0, 2e6), (1000.0, 3e5)]);
        points[2].complete = false;
        let series = vec![Series {
            name: "seed".into(),
            points,
        }];
        let category = |title: &str, complete: bool| CategoryPanel {
            title: title.into(),
            categories: vec!["p50", "p99", "p99.9"],
            y_desc: "ms",
            log_y: true,
            series: vec![Series {
                name: "seed".into(),
                points: (0..3)
                    .map(|i| Point {
                        x: i as f64,
                        y: 1.0 + i as f64,
                        complete,
                    })
                    .collect(),
            }],
        };
        let figures = Figures {
            throughput: series.clone(),
            p99: series,
            rate: Some(category("rate n=500: latency", true)),
            idle: Some(CategoryPanel {
                log_y: false,
                ..category("idle n=5000: KiB per connection", false)
            }),
        };
        write_svg(&path, &figures).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains(HOLLOW_NOTE));
        assert!(svg.contains("rate n=500: latency") && svg.contains("idle n=5000"));
        assert!(texts(&svg).contains(&"p99.9"));
        // Filled markers for complete points, unfilled for the others.
        assert!(svg.contains(r#"fill="none""#), "no hollow marker");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_long_legend_wraps_and_a_zero_is_left_out() {
        let servers: Vec<Series> = (0..12)
            .map(|i| Series {
                name: format!("server-number-{i}"),
                points: complete(&[(10.0, if i == 0 { 0.0 } else { 1e6 }), (100.0, 2e6)]),
            })
            .collect();
        let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        let places = legend_places(&names, true);
        assert_eq!(places.len(), 13);
        assert!(places.iter().all(|&(x, _)| x < WIDTH as i32));
        assert!(places.last().is_some_and(|&(_, row)| row >= 1));
        let (dir, path) = temp_svg("legend");
        write_svg(&path, &fanout_only(servers.clone(), servers)).unwrap();
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
