"""The dashboard in a real browser (headless chromium through Playwright). A package, so its tests
import their conftest's helpers as `browser.conftest` (tests/ is on the path), never the other
`conftest`."""
