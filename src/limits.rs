//! Sandbox limits (DESIGN 2.4), with their defaults.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Limits {
    pub timeout: Duration,
    pub max_operations: u64,
    pub memory_bytes: usize,
    pub max_string_bytes: usize,
    pub max_array_items: usize,
    pub max_map_entries: usize,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_fn_expr_depth: usize,
    pub max_log_lines: usize,
    pub max_log_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_millis(50),
            max_operations: 1_000_000,
            memory_bytes: 64 << 20,
            max_string_bytes: 1 << 20,
            max_array_items: 100_000,
            max_map_entries: 10_000,
            max_call_levels: 64,
            max_expr_depth: 64,
            max_fn_expr_depth: 32,
            max_log_lines: 100,
            max_log_line_bytes: 1024,
        }
    }
}

/// The names accepted from Python, in the order `Limits` declares them.
pub const LIMIT_KEYS: &[&str] = &[
    "timeout_ms",
    "max_operations",
    "memory_bytes",
    "max_string_bytes",
    "max_array_items",
    "max_map_entries",
    "max_call_levels",
    "max_expr_depth",
    "max_fn_expr_depth",
    "max_log_lines",
    "max_log_line_bytes",
];

impl Limits {
    /// Sets one limit by its public name; the caller has checked `value > 0`.
    pub fn set(&mut self, key: &str, value: u64) -> Result<(), String> {
        let v = value as usize;
        match key {
            "timeout_ms" => self.timeout = Duration::from_millis(value),
            "max_operations" => self.max_operations = value,
            "memory_bytes" => self.memory_bytes = v,
            "max_string_bytes" => self.max_string_bytes = v,
            "max_array_items" => self.max_array_items = v,
            "max_map_entries" => self.max_map_entries = v,
            "max_call_levels" => self.max_call_levels = v,
            "max_expr_depth" => self.max_expr_depth = v,
            "max_fn_expr_depth" => self.max_fn_expr_depth = v,
            "max_log_lines" => self.max_log_lines = v,
            "max_log_line_bytes" => self.max_log_line_bytes = v,
            _ => return Err(format!("unknown limit '{key}' (known: {})", LIMIT_KEYS.join(", "))),
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> u64 {
        match key {
            "timeout_ms" => self.timeout.as_millis() as u64,
            "max_operations" => self.max_operations,
            "memory_bytes" => self.memory_bytes as u64,
            "max_string_bytes" => self.max_string_bytes as u64,
            "max_array_items" => self.max_array_items as u64,
            "max_map_entries" => self.max_map_entries as u64,
            "max_call_levels" => self.max_call_levels as u64,
            "max_expr_depth" => self.max_expr_depth as u64,
            "max_fn_expr_depth" => self.max_fn_expr_depth as u64,
            "max_log_lines" => self.max_log_lines as u64,
            "max_log_line_bytes" => self.max_log_line_bytes as u64,
            _ => 0,
        }
    }
}
