-- Orthanc auto-routing for her2-dicom-worker.
--
-- When a series becomes stable (no new instance for Orthanc's "StableAge"
-- seconds), send it to the HER2 listener if it is a slide (Modality SM) whose
-- Series Description names the HER2 stain. Everything else (other stains,
-- other modalities, and our own SR/SEG results coming back) stays put.
--
-- The listener must be declared in the Orthanc configuration as the DICOM
-- modality named by HER2_MODALITY, e.g.
--   "DicomModalities": { "her2": [ "HER2WORKER", "listener-host", 11112 ] }

HER2_MODALITY = 'her2'
HER2_DESCRIPTION_PATTERN = 'HER2'   -- plain, case-insensitive substring of SeriesDescription

function OnStableSeries(seriesId, tags, metadata)
   if tags['Modality'] ~= 'SM' then
      return
   end
   local description = string.upper(tags['SeriesDescription'] or '')
   if not string.find(description, HER2_DESCRIPTION_PATTERN, 1, true) then
      print('her2 route: slide series ' .. seriesId .. ' not routed: SeriesDescription does not name HER2')
      return
   end
   print('her2 route: sending slide series ' .. seriesId .. ' to ' .. HER2_MODALITY)
   RestApiPost('/modalities/' .. HER2_MODALITY .. '/store', seriesId)
end
