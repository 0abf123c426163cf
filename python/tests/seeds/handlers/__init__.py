"""The seeds' Python handlers, under the module path their tests import
(``from handlers.ecommerce import ...``)."""
