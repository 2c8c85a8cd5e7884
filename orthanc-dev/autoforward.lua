-- Auto-forward every stable series to the AI node: the modality "AINODE" of the Orthanc configuration.
--
-- Two guards keep results from bouncing between Orthanc and the node:
--   * result objects (SEG, SR, KO, PR) are never forwarded, whoever sent them;
--   * a series whose first instance arrived from the node's own AE title is never forwarded back.
-- The node's AE title is read from the same DicomModalities entry the series is sent to, so the
-- configuration holds it once. Only Orthanc series ids are logged: no patient data.

local NODE_MODALITY = 'AINODE'
local SKIPPED_MODALITIES = { SEG = true, SR = true, KO = true, PR = true }

local function trim(s)
  return (string.gsub(s or '', '^%s*(.-)%s*$', '%1'))
end

-- DicomModalities entries are either {"AET": .., "Host": .., "Port": ..} or [aet, host, port].
local function node_aet()
  local modalities = GetOrthancConfiguration()['DicomModalities'] or {}
  local node = modalities[NODE_MODALITY]
  if node == nil then
    error('auto-forward: no DicomModalities entry named ' .. NODE_MODALITY)
  end
  return trim(node['AET'] or node[1])
end

local NODE_AET = node_aet()
print('auto-forward: stable series go to ' .. NODE_MODALITY .. ' (AET ' .. NODE_AET .. ')')

-- RemoteAET (the calling AE of the association that stored the instance) is instance metadata;
-- STOW-RS and REST uploads leave it empty.
local function first_instance_remote_aet(seriesId)
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  if series == nil or series['Instances'] == nil or series['Instances'][1] == nil then
    return ''
  end
  local metadata = ParseJson(RestApiGet('/instances/' .. series['Instances'][1] .. '/metadata?expand'))
  if metadata == nil then
    return ''
  end
  return trim(metadata['RemoteAET'])
end

function OnStableSeries(seriesId, tags, metadata)
  local modality = trim(tags['Modality'])
  if SKIPPED_MODALITIES[modality] then
    print('auto-forward: skip series ' .. seriesId .. ' (modality ' .. modality .. ')')
    return
  end
  if first_instance_remote_aet(seriesId) == NODE_AET then
    print('auto-forward: skip series ' .. seriesId .. ' (sent by the node itself)')
    return
  end
  -- Lua SendToModality() takes instance ids in Orthanc 1.10.1, so a series goes through the REST API;
  -- an asynchronous job keeps this callback short (the job retries nothing: a failed send shows in /jobs).
  local job = ParseJson(RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
                                    DumpJson({ Resources = { seriesId }, Asynchronous = true }, true)))
  print('auto-forward: series ' .. seriesId .. ' -> ' .. NODE_MODALITY .. ' job ' .. tostring(job and job['ID']))
end
