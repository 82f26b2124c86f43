"""A development viewer: a private Orthanc with DICOMweb and one page (``page/index.html``) that shows a scored
slide with its HER2 results in dicom-microscopy-viewer (``her2 view``). Not a clinical viewer."""
