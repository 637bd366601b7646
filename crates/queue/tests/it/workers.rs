//! In-process workers against a real store and the real clock.
