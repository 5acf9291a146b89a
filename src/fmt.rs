//! `moec fmt SPEC... [--check]`: rewrites specs in the canonical layout of
//! [`moec_grammar::format`] (comments kept). A directory stands for every `.moe` file below it.
//! With `--check` nothing is written: the command lists the files whose layout differs and fails if
//! there are any (for CI).

use miette::{Context, IntoDiagnostic, Result};
use std::path::{Path, PathBuf};

pub fn run(paths: &[PathBuf], check: bool) -> Result<()> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files)?;
    }
    let mut differ = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file)
            .into_diagnostic()
            .wrap_err_with(|| format!("cannot read spec `{}`", file.display()))?;
        let formatted =
            moec_grammar::format(&source).map_err(|d| d.with_path(file.display().to_string()))?;
        if formatted == source {
            continue;
        }
        if check {
            println!("{} is not formatted", file.display());
        } else {
            std::fs::write(file, &formatted)
                .into_diagnostic()
                .wrap_err_with(|| format!("cannot write `{}`", file.display()))?;
            println!("formatted {}", file.display());
        }
        differ.push(file);
    }
    if check && !differ.is_empty() {
        miette::bail!(
            "{} of {} specs are not in the canonical layout; `moec fmt` them",
            differ.len(),
            files.len()
        );
    }
    Ok(())
}

/// `path` itself, or every `.moe` file below it (sorted) when it is a directory.
fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    if !path.is_dir() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot read directory `{}`", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .into_diagnostic()?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() || entry.extension().is_some_and(|x| x == "moe") {
            collect(&entry, files)?;
        }
    }
    Ok(())
}
