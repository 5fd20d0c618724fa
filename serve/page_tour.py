"""Walk through the page at ``GET /`` of a running ``metarec serve`` in a real browser.

Headless Chromium from Debian's packages (``apt-get install chromium``; ``make
setup-browser``), driven by Playwright with ``executable_path`` pointed at it: Playwright's
own browser download is never used. The tour does what a person would: opens the page,
enters the token when the server asks for one, rates the first ``--rate`` onboarding items
(the last one with the keyboard: focus, Enter), and reads what the page shows after each
answer; it toggles the list without adaptation, and saves screenshots at desktop and phone
width. The last line of stdout is JSON of what it saw, which ``tests/test_page.py`` checks
and the README's screenshot comes from::

    .venv/bin/python serve/page_tour.py --url http://127.0.0.1:8000 --out docs/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

# Flags for a closed network (no background fetches to Google's hosts) and a root user.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    """``METAREC_CHROMIUM``, else Debian's ``chromium`` on PATH."""
    return os.environ.get("METAREC_CHROMIUM") or shutil.which("chromium")


def _console(seen: dict[str, Any], message: Any) -> None:
    """Console errors: a 401 (the server asking for its token) apart from the rest."""
    if message.type == "error":
        seen["refused" if "401" in message.text else "errors"].append(message.text)


def _list(page: Any) -> list[dict[str, Any]]:
    """The recommendation list as shown: title, movement badge, the "because" line and
    its reasons."""
    return page.eval_on_selector_all(
        "#recs > li",
        """rows => rows.map(li => ({
            title: li.querySelector('.title').textContent,
            move: li.querySelector('.move').textContent,
            because: li.querySelector('.because')?.textContent ?? null,
            reasons: [...li.querySelectorAll('.reason')].map(b => b.textContent),
        }))""",
    )


def _wait_for_list(page: Any, after: int) -> int:
    """Wait until a list newer than ``after`` is on screen; its sequence number."""
    # a function, not an expression: the page's policy forbids eval, which an expression needs
    try:
        page.wait_for_function("n => Number(document.body.dataset.ready || 0) > n", arg=after)
    except Exception as e:  # say what the page said
        raise RuntimeError(f"no new list; the page says: {page.text_content('#status')!r}") from e
    return int(page.evaluate("document.body.dataset.ready"))


def _audit(page: Any) -> dict[str, Any]:
    """What a reviewer checks on any page: script from data never ran, every control has a
    name, nothing scrolls sideways."""
    return page.evaluate(
        """() => ({
            pwned: window.pwned ?? null,
            injected: document.querySelectorAll('main img, main script').length,
            unnamed: [...document.querySelectorAll('button, input')]
                .filter(e => !e.hidden && e.offsetParent !== null)
                .filter(e => !(e.getAttribute('aria-label') || e.labels?.length
                               || e.textContent.trim()))
                .map(e => e.outerHTML.slice(0, 80)),
            overflow: document.documentElement.scrollWidth > window.innerWidth,
        })"""
    )


def tour(url: str, *, token: str | None, rate: int, out: Path, chromium: str) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {"errors": [], "refused": [], "steps": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=DESKTOP)
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.on("console", lambda m: _console(seen, m))
            page.goto(url)
            if token is not None:
                page.wait_for_selector("#token-form:not([hidden])")
                page.fill("#token", token)
                page.press("#token", "Enter")
            ready = _wait_for_list(page, 0)
            seen["before"] = _list(page)
            cards = page.locator("#ask > li")
            seen["asked"] = cards.locator(".title").all_text_contents()
            for n in range(rate):
                buttons = cards.nth(n).locator("button")
                # the best answer, the worst for the last of several: a taste, not a constant
                button = buttons.first if n == rate - 1 and rate > 1 else buttons.last
                seen["steps"].append(
                    {"item": seen["asked"][n], "answer": button.text_content(), "keyboard": False}
                )
                if n == rate - 1:  # the keyboard: focus, Enter
                    button.focus()
                    page.keyboard.press("Enter")
                    seen["steps"][-1]["keyboard"] = True
                else:
                    button.click()
                ready = _wait_for_list(page, ready)
                seen["steps"][-1]["list"] = _list(page)
            seen["status"] = page.text_content("#status")
            seen["audit_desktop"] = _audit(page)
            page.screenshot(path=str(out / "page-desktop.png"), full_page=True)
            page.set_viewport_size(PHONE)
            seen["audit_phone"] = _audit(page)
            page.screenshot(path=str(out / "page-phone.png"), full_page=True)
            page.set_viewport_size(DESKTOP)
            page.check("#plain")
            _wait_for_list(page, ready)
            seen["plain"] = _list(page)
            seen["after"] = seen["steps"][-1]["list"] if seen["steps"] else seen["before"]
        finally:
            browser.close()
    seen["screenshots"] = [str(out / "page-desktop.png"), str(out / "page-phone.png")]
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--token", default=os.environ.get("METAREC_API_TOKEN"))
    ap.add_argument("--rate", type=int, default=3, help="onboarding items to answer")
    ap.add_argument("--out", type=Path, default=Path("."), help="where screenshots go")
    ap.add_argument("--chromium", default=chromium_path(), help="the browser binary")
    args = ap.parse_args()
    if not args.chromium:
        raise SystemExit("no chromium found: `make setup-browser`, or pass --chromium PATH")
    seen = tour(args.url, token=args.token, rate=args.rate, out=args.out, chromium=args.chromium)
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
