//! The HTTP layer: state, router, handlers, middleware and the error answer. Handlers take the
//! state; the router imports the handlers; nothing here is imported back by the modules below it.

pub mod error;
pub mod limiter;
pub mod login;
pub mod middleware;
pub mod router;
pub mod state;
pub mod webhook;

pub use router::build_router;
pub use state::AppState;
