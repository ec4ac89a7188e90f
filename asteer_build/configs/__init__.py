"""Configs shipped inside the package, so an installed `asteer-build` finds them by name
(`asteer-build plan asteer-paper`, `asteer-build demo`) wherever it runs; the checkout's
`configs/` is a link to this folder."""
