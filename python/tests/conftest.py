import os
import sys

# Handler modules the tests name by import path live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
