//! The comparison's charts: grouped bars of IOPS and of p50 and p99 latency per workload and
//! target, drawn with plotters into PNG files.

use crate::fio::Cell;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Font for chart text: DejaVu Sans from Debian's fonts-dejavu-core.
const CHART_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const CHART_COLORS: [plotters::style::RGBColor; 6] = [
    plotters::style::RGBColor(90, 90, 90),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(148, 103, 189),
];

/// A grouped bar chart: one group per workload, one bar per target.
fn bar_chart(
    path: &Path,
    title: &str,
    unit: &str,
    workloads: &[String],
    targets: &[String],
    value: impl Fn(&str, &str) -> f64,
) -> Result<()> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = workloads
        .iter()
        .flat_map(|w| targets.iter().map(move |t| (w, t)))
        .map(|(w, t)| value(w, t))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..workloads.len() as f64, 0f64..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(workloads.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < workloads.len() {
                workloads[i].clone()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc(unit)
        .label_style(("sans-serif", 15))
        .draw()?;
    let n = targets.len() as f64;
    for (ti, t) in targets.iter().enumerate() {
        let color = CHART_COLORS[ti % CHART_COLORS.len()];
        chart
            .draw_series(workloads.iter().enumerate().map(|(wi, w)| {
                let x0 = wi as f64 + 0.1 + 0.8 * ti as f64 / n;
                let x1 = x0 + 0.8 / n * 0.9;
                Rectangle::new([(x0, 0.0), (x1, value(w, t))], color.filled())
            }))?
            .label(t.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

/// iops.png and latency.png (p50 and p99) in the results folder. Needs the DejaVu font.
pub fn charts(results: &Path, cells: &[Cell]) -> Result<Vec<PathBuf>> {
    let font = std::fs::read(CHART_FONT)
        .with_context(|| format!("read {CHART_FONT} (Debian package fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{CHART_FONT} is not a usable font"))?;
    let mut workloads: Vec<String> = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    for c in cells {
        if !workloads.contains(&c.workload) {
            workloads.push(c.workload.clone());
        }
        if !targets.contains(&c.target) {
            targets.push(c.target.clone());
        }
    }
    let find = |w: &str, t: &str| cells.iter().find(|c| c.workload == w && c.target == t);
    let iops = results.join("iops.png");
    bar_chart(
        &iops,
        "IOPS by workload (median)",
        "IOPS",
        &workloads,
        &targets,
        |w, t| find(w, t).map(|c| c.iops_median).unwrap_or(0.0),
    )?;
    let p50 = results.join("latency-p50.png");
    bar_chart(
        &p50,
        "Completion latency p50 (median of runs)",
        "µs",
        &workloads,
        &targets,
        |w, t| find(w, t).map(|c| c.lat_p50_us_median).unwrap_or(0.0),
    )?;
    let p99 = results.join("latency-p99.png");
    bar_chart(
        &p99,
        "Completion latency p99 (median of runs)",
        "µs",
        &workloads,
        &targets,
        |w, t| find(w, t).map(|c| c.lat_p99_us_median).unwrap_or(0.0),
    )?;
    Ok(vec![iops, p50, p99])
}
