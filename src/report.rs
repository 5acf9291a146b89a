//! `moec report RUN_DIR...`: compares training runs from their metrics logs (see
//! [`moec_runtime::report`] for what is plotted and how the table's columns are computed).

use miette::{IntoDiagnostic, Result};
use moec_runtime::report::{load_runs, write_report};
use std::path::{Path, PathBuf};

/// Loads every run (all must load before anything is written), writes the report into `out`,
/// and prints the table and where the report is.
pub fn run(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let runs = load_runs(dirs).into_diagnostic()?;
    let report = write_report(&runs, out).into_diagnostic()?;
    print!("{}", report.table);
    println!(
        "wrote {} and {} plot files in {}",
        report.markdown.display(),
        report.plots.len(),
        out.display()
    );
    Ok(())
}
