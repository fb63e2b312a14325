"""Project Gutenberg as training text: where books come from (sources: folders, mirrors and their zips,
the catalog, downloads, the embedded sample), one book's text without what Gutenberg added (text),
and the pipeline that cleans and combines a collection (prepare). prep_dataset.py is its command line."""
