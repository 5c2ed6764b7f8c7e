//! Sizes for people: `1.00 GiB`, and `1.00 GiB (1073741824 bytes)` where
//! the exact figure matters too.

/// `1.00 GiB`-style rendering (binary units).
pub fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// `64.00 MiB (67108864 bytes)`: readable and exact.
pub fn human_exact(b: u64) -> String {
    if b < 1024 {
        return format!("{b} bytes");
    }
    format!("{} ({b} bytes)", human(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering() {
        assert_eq!(human(1 << 30), "1.00 GiB");
        assert_eq!(human(512), "512 B");
        assert_eq!(human_exact(64 << 20), "64.00 MiB (67108864 bytes)");
        assert_eq!(human_exact(100), "100 bytes");
    }
}
