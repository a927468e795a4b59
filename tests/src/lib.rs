//! Helpers for the system tests live here.
