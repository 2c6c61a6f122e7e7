"""The registry of filters. Importing it registers every filter and its config keys."""
