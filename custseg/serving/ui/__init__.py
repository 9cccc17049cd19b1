"""The web app under ``/ui/`` and the ``/docs`` page, served by the API's own process.

Pages are server-rendered Jinja2 templates (``templates/``); every script, stylesheet and chart library
they load is a file in ``static/`` (vendored with ``tools/vendor_assets.sh``), so a page makes no request
to another host. Page handlers call the same parsing and scoring functions as the JSON routes.
"""
