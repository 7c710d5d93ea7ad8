"""The Binder service: share links, the /build event stream, launches (BinderHub's role)."""
