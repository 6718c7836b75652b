//! The SVG plots of a trip replay (plotters, SVG backend only: no font
//! library is needed; text is written as SVG `<text>` for the viewer to
//! render).

use std::path::Path;

use hexmatch::sim::{Fate, Sample, SimOutcome};
use plotters::prelude::*;

/// A line of the fleet chart: label, colour, value of a sample.
type Series = (&'static str, RGBColor, fn(&Sample) -> usize);

/// Most bars in the wait histogram; wider bins beyond that.
const MAX_BINS: u32 = 60;

/// Draws the wait-time histogram (top) and the fleet over time (bottom)
/// into one SVG file at `path`.
pub(crate) fn write_svg(path: &Path, outcome: &SimOutcome, title: &str) -> Result<(), String> {
    let mut svg = String::new();
    draw(&mut svg, outcome, title).map_err(|e| format!("plotting: {e}"))?;
    std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))
}

fn draw(svg: &mut String, outcome: &SimOutcome, title: &str) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::with_string(svg, (960, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(360);
    wait_histogram(&top, outcome)?;
    fleet_timeline(&bottom, outcome)?;
    root.present().map_err(|e| err(&e))
}

/// The wait histogram: bins of `width` minutes up to the p99 wait; the
/// last bin also holds every longer wait (the slowest 1 %).
struct WaitBins {
    width: u32,
    counts: Vec<u32>,
}

fn wait_bins(outcome: &SimOutcome) -> WaitBins {
    let cap_min = (outcome.report.wait_s.p99 / 60.0).ceil() as u32;
    let width = cap_min / MAX_BINS + 1;
    let mut counts = vec![0u32; (cap_min / width + 1) as usize];
    let last = counts.len() - 1;
    for o in &outcome.orders {
        if let Fate::Served(s) = &o.fate {
            let wait_min = (s.pickup_at.as_millis() - o.requested_at.as_millis()) / 60_000;
            let bin = usize::try_from(wait_min).unwrap_or(0) / width as usize;
            counts[bin.min(last)] += 1;
        }
    }
    WaitBins { width, counts }
}

fn wait_histogram(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    outcome: &SimOutcome,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let WaitBins { width, counts } = wait_bins(outcome);
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let n = counts.len() as u32;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "Wait for pickup, {} served orders (mean {:.0} s, p50 {:.0} s, p90 {:.0} s)",
                outcome.report.served,
                outcome.report.wait_s.mean,
                outcome.report.wait_s.p50,
                outcome.report.wait_s.p90
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0u32..n).into_segmented(), 0u32..top + top / 10 + 1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(format!(
            "wait, minutes (bins of {width} min; the last bar also holds the waits above p99, {:.0} min)",
            outcome.report.wait_s.p99 / 60.0
        ))
        .y_desc("orders")
        .x_label_formatter(&|v| match v {
            SegmentValue::Exact(b) | SegmentValue::CenterOf(b) => (b * width).to_string(),
            SegmentValue::Last => String::new(),
        })
        .draw()
        .map_err(|e| err(&e))?;
    // Bars drawn in bin order (plotters' `Histogram` sums bins in a hash
    // map, so its output order, and the SVG's bytes, would vary by run).
    let color = RGBColor(52, 101, 164);
    chart
        .draw_series(counts.iter().enumerate().map(|(i, c)| {
            let i = i as u32;
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0),
                    (SegmentValue::Exact(i + 1), *c),
                ],
                color.filled(),
            );
            bar.set_margin(0, 0, 1, 1);
            bar
        }))
        .map_err(|e| err(&e))?;
    Ok(())
}

fn fleet_timeline(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    outcome: &SimOutcome,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let timeline = &outcome.timeline;
    let start = timeline.first().map_or(0, |s| s.at.as_millis());
    let hours = |ms: i64| (ms - start) as f64 / 3_600_000.0;
    let end_h = timeline
        .last()
        .map_or(1.0, |s| hours(s.at.as_millis()))
        .max(0.01);
    let top = timeline
        .iter()
        .map(|s| s.idle.max(s.serving).max(s.waiting))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "Fleet over time: {} drivers, {:.1} % of the time driving",
                outcome.report.drivers,
                outcome.report.utilisation * 100.0
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end_h, 0usize..top + top / 10 + 1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "hours since the first order ({})",
            timeline
                .first()
                .map_or_else(String::new, |s| s.at.to_string())
        ))
        .y_desc("drivers / orders")
        .draw()
        .map_err(|e| err(&e))?;
    let series: [Series; 3] = [
        (
            "serving (reserved, to pickup, on trip)",
            RGBColor(204, 0, 0),
            |s| s.serving,
        ),
        ("idle", RGBColor(52, 101, 164), |s| s.idle),
        ("orders waiting", RGBColor(115, 210, 22), |s| s.waiting),
    ];
    for (label, color, value) in series {
        chart
            .draw_series(LineSeries::new(
                timeline.iter().map(|s| (hours(s.at.as_millis()), value(s))),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}
