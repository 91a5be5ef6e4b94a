//! `calibrate --html PAGE`: one self-contained page with every layer's
//! factors, a cosine bar per layer and an input histogram per layer whose
//! clip lines sit where the layer's factors put its int8 grid; written with
//! the other files or on its own, never when the run fails.

mod common;

#[test]
fn the_page_shows_every_layer_with_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("pages");
    for (prefix, page) in [
        // Beside the outputs (written with them), and in another folder.
        (dir.path().join("q"), dir.path().join("q.html")),
        (dir.path().join("r"), pages.join("calibration.html")),
    ] {
        let o = common::calibrate_digits(&prefix)
            .args(["--quiet", "--batch-size", "10", "--html"])
            .arg(&page)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let html = std::fs::read_to_string(&page).unwrap();
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{}_quant_report.json", prefix.display())).unwrap(),
        )
        .unwrap();
        let layers = report["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 4);
        // Self-contained: no scripts, nothing fetched.
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(!html.contains("<script"));
        assert_eq!(
            html.matches("http").count(),
            html.matches("http://www.w3.org/2000/svg").count(),
            "only the SVG namespace may name an address"
        );
        assert_eq!(html.matches("class=\"bar\"").count(), 4);
        assert_eq!(html.matches("class=\"bin\"").count(), 4 * 64);
        assert_eq!(html.matches("class=\"clip\"").count(), 8);
        for l in layers {
            let name = l["name"].as_str().unwrap();
            assert!(html.contains(&format!("<h3>{name}</h3>")), "{name}");
            // The grid of scale s and offset o keeps [(-128 - o)·s, (127 - o)·s].
            let s = l["scale_d"].as_f64().unwrap() as f32;
            let o = l["offset_d"].as_i64().unwrap() as f32;
            let (lo, hi) = ((-128.0 - o) * s, (127.0 - o) * s);
            assert!(html.contains(&format!("clip min {lo:.4}")), "{name}: {lo}");
            assert!(html.contains(&format!("clip max {hi:.4}")), "{name}: {hi}");
            assert!(
                html.contains(&format!("{s:.5e}")),
                "{name}: scale_d in the table"
            );
        }
    }
}

#[test]
fn a_page_that_cannot_be_written_stops_the_run_before_any_file() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let prefix = dir.path().join("q");
    let o = common::calibrate_digits(&prefix)
        .args(["--quiet", "--batch-size", "10", "--html"])
        .arg(blocker.join("page.html"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // The message names the folder the page cannot go to.
    assert!(
        err.contains(&blocker.display().to_string()) && err.contains("output folder"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the blocking file remains: {left:?}");
}
