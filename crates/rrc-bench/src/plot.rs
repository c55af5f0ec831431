//! The latency distributions of `rrc bench failover --mode responsive` as an
//! SVG: one panel per application, one line per container (plain,
//! recorded, checkpoint-only, responsive), the fraction of replies at or
//! below each latency on a logarithmic latency axis.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::failover_bench::{FailoverReport, Load};

const PANEL_HEIGHT: u32 = 300;
const WIDTH: u32 = 900;

/// Writes the plot of `r`'s side-by-side loads to `path`.
pub fn latency_cdfs(r: &FailoverReport, path: &Path) -> Result<()> {
    anyhow::ensure!(
        !r.responsive.is_empty(),
        "no side-by-side loads to plot (they are measured with --mode responsive)"
    );
    let height = PANEL_HEIGHT * r.responsive.len() as u32;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let panels = root.split_evenly((r.responsive.len(), 1));
    for (panel, o) in panels.iter().zip(&r.responsive) {
        let series: [(&str, &Load, RGBColor); 4] = [
            ("plain", &o.plain, RGBColor(0, 0, 0)),
            ("recorded", &o.recorded, RGBColor(120, 120, 120)),
            ("checkpoint", &o.checkpoint, RGBColor(200, 60, 40)),
            ("responsive", &o.responsive, RGBColor(30, 90, 200)),
        ];
        let (lo, hi) = series
            .iter()
            .flat_map(|(_, l, _)| l.cdf.iter().map(|(us, _)| *us))
            .fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let lo = (lo / 1000.0).clamp(0.001, 1.0);
        let hi = (hi / 1000.0).max(lo * 10.0);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{}: latency of closed-loop requests (epoch {:.0} ms)",
                    o.app.name(),
                    r.epoch_ms
                ),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc("latency (ms, log scale)")
            .y_desc("fraction of replies")
            .draw()
            .map_err(draw)?;
        for (name, load, color) in series {
            chart
                .draw_series(LineSeries::new(
                    load.cdf.iter().map(|(us, q)| (us / 1000.0, *q)),
                    color.stroke_width(2),
                ))
                .map_err(draw)?
                .label(format!("{name} ({:.0} req/s)", load.per_sec))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}
